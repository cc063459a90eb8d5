/*
 * mlc_nccl: an NCCL collective communication library (CCL) for TVM disco workers on CUDA GPUs.
 *
 * Part of mlc_course.  Written for the course against the public disco CCL contract of
 * apache-tvm 0.27 (the global functions `runtime.disco.<ccl>.<op>` that disco builtins such as
 * `runtime.disco.allreduce` look up through the worker's `ccl` field) and NCCL's public C API;
 * no TVM code is copied.  The apache-tvm wheel is built without NCCL, so this plugin brings it.
 *
 * Contract (same layout as cpu_shm.cc)
 * ------------------------------------
 *   controller: runtime.disco.mlc_nccl.init_ccl(session, device_ids)
 *       creates an ncclUniqueId (ncclGetUniqueId) and calls init_ccl_per_worker on every worker
 *       with the 128 id bytes, then waits for every worker (errors surface here).
 *   worker:     runtime.disco.mlc_nccl.init_ccl_per_worker(device_ids, id_bytes, ...)
 *       cudaSetDevice(device_ids[local_worker_id]); a dedicated CUDA stream; ncclCommInitRank
 *       (one global communicator, plus ncclCommSplit into groups when num_groups > 1); sets the
 *       worker's default_device (if still CPU) and `ccl` = "mlc_nccl".
 *   ops:        allreduce, allgather, broadcast_from_worker0, scatter_from_worker0,
 *               gather_to_worker0, recv_from_worker0, send_to_worker, recv_from_worker,
 *               send_to_next_group, recv_from_prev_group, sync_worker.
 *
 * Streams
 * -------
 * TVM 0.27 launches its kernels on the stream that TVMFFIEnvGetStream(kDLCUDA, dev) returns
 * (cuda_module.cc); unless someone set one (CUDA-graph capture does) that is NULL, i.e. the
 * legacy default stream.  Every collective here asks for that stream first and enqueues on it
 * when it is set, so it is captured with the kernels; otherwise it uses the worker's own stream,
 * made with cudaStreamCreate (a *blocking* stream: the legacy default stream waits for it and
 * it waits for the legacy default stream, so the NCCL kernels are ordered with TVM's kernels
 * and with TVM's cudaMemcpy-based copies without any extra event).  sync_worker synchronises
 * the stream a collective would use now.
 *
 * Linking
 * -------
 * libnccl and libcudart are opened with dlopen at the first use (init_ccl), not linked: the
 * library builds with g++ alone and loads on a machine with no GPU (CI checks that it
 * registers every function), and a missing libnccl gives an error that says where it looked.
 * The function types come from NCCL's and CUDA's real headers when the build found them
 * (MLC_NCCL_WITH_HEADERS; then the compiler checks every signature and enum value used here);
 * without them, from the small declarations below, which follow the public, stable ABI.
 */
#include <dlfcn.h>
#include <dlpack/dlpack.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/reflection/registry.h>
#include <tvm/ffi/string.h>
#include <tvm/runtime/disco/builtin.h>
#include <tvm/runtime/disco/disco_worker.h>
#include <tvm/runtime/disco/session.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#ifndef MLC_CCL_NAME
#define MLC_CCL_NAME "mlc_nccl"
#endif

#ifdef MLC_NCCL_WITH_HEADERS
#include <cuda_runtime_api.h>
#include <nccl.h>
#endif

namespace mlc_course {
namespace nccl_ccl {

using tvm::runtime::DiscoWorker;
using tvm::runtime::DRef;
using tvm::runtime::ReduceKind;
using tvm::runtime::Session;
using tvm::runtime::Tensor;
namespace ffi = tvm::ffi;

#define CCL_ERROR TVM_FFI_THROW(RuntimeError) << "[" MLC_CCL_NAME "] "

// ------------------------------------------------------------------------------------------
// The slice of the NCCL and CUDA runtime C APIs used here
// ------------------------------------------------------------------------------------------
namespace api {
#ifdef MLC_NCCL_WITH_HEADERS
using Result = ncclResult_t;
using DataType = ncclDataType_t;
using RedOp = ncclRedOp_t;
using Comm = ncclComm_t;
using UniqueId = ncclUniqueId;
using Config = ncclConfig_t;
using Stream = cudaStream_t;
using Event = cudaEvent_t;
using CudaError = cudaError_t;
#else
using Result = int;      // ncclResult_t (a C enum: passed as a 32-bit integer)
using DataType = int;    // ncclDataType_t
using RedOp = int;       // ncclRedOp_t
struct ncclComm;
using Comm = ncclComm*;  // opaque
struct UniqueId {
  char internal[128];  // NCCL_UNIQUE_ID_BYTES
};
struct Config;           // only ever passed as NULL
struct CUstream_st;
using Stream = CUstream_st*;
struct CUevent_st;
using Event = CUevent_st*;
using CudaError = int;   // cudaError_t
#endif

constexpr int kSuccess = 0;      // ncclSuccess, cudaSuccess
constexpr int kInProgress = 7;   // ncclInProgress
constexpr int kUniqueIdBytes = 128;
// ncclDataType_t
constexpr int kInt8 = 0, kUint8 = 1, kInt32 = 2, kUint32 = 3, kInt64 = 4, kUint64 = 5,
              kFloat16 = 6, kFloat32 = 7, kFloat64 = 8, kBfloat16 = 9;
// ncclRedOp_t (NB: min/max are in the opposite order from TVM's ReduceKind)
constexpr int kOpSum = 0, kOpProd = 1, kOpMax = 2, kOpMin = 3, kOpAvg = 4;

using GetVersionFn = Result (*)(int*);
using GetUniqueIdFn = Result (*)(UniqueId*);
using CommInitRankFn = Result (*)(Comm*, int, UniqueId, int);
using CommSplitFn = Result (*)(Comm, int, int, Comm*, Config*);
using CommDestroyFn = Result (*)(Comm);
using GetErrorStringFn = const char* (*)(Result);
using GetLastErrorFn = const char* (*)(Comm);
using AllReduceFn = Result (*)(const void*, void*, size_t, DataType, RedOp, Comm, Stream);
using BroadcastFn = Result (*)(const void*, void*, size_t, DataType, int, Comm, Stream);
using AllGatherFn = Result (*)(const void*, void*, size_t, DataType, Comm, Stream);
using SendFn = Result (*)(const void*, size_t, DataType, int, Comm, Stream);
using RecvFn = Result (*)(void*, size_t, DataType, int, Comm, Stream);
using GroupFn = Result (*)();

using CudaIntFn = CudaError (*)(int);
using CudaIntPtrFn = CudaError (*)(int*);
using CudaStreamCreateFn = CudaError (*)(Stream*);
using CudaStreamFn = CudaError (*)(Stream);
using CudaErrorStringFn = const char* (*)(CudaError);
using CudaEventCreateFn = CudaError (*)(Event*);
using CudaEventRecordFn = CudaError (*)(Event, Stream);
using CudaEventFn = CudaError (*)(Event);
using CudaEventElapsedFn = CudaError (*)(float*, Event, Event);

#ifdef MLC_NCCL_WITH_HEADERS
// The build found the real headers: let the compiler check every assumption above.
static_assert(sizeof(ncclUniqueId) == kUniqueIdBytes, "ncclUniqueId size");
static_assert(ncclSuccess == kSuccess && ncclInProgress == kInProgress, "ncclResult_t");
static_assert(cudaSuccess == kSuccess, "cudaError_t");
static_assert(ncclInt8 == kInt8 && ncclUint8 == kUint8 && ncclInt32 == kInt32 &&
                  ncclUint32 == kUint32 && ncclInt64 == kInt64 && ncclUint64 == kUint64 &&
                  ncclFloat16 == kFloat16 && ncclFloat32 == kFloat32 &&
                  ncclFloat64 == kFloat64 && ncclBfloat16 == kBfloat16,
              "ncclDataType_t");
static_assert(ncclSum == kOpSum && ncclProd == kOpProd && ncclMax == kOpMax &&
                  ncclMin == kOpMin && ncclAvg == kOpAvg,
              "ncclRedOp_t");
static_assert(std::is_same_v<GetVersionFn, decltype(&::ncclGetVersion)>);
static_assert(std::is_same_v<GetUniqueIdFn, decltype(&::ncclGetUniqueId)>);
static_assert(std::is_same_v<CommInitRankFn, decltype(&::ncclCommInitRank)>);
static_assert(std::is_same_v<CommSplitFn, decltype(&::ncclCommSplit)>);
static_assert(std::is_same_v<CommDestroyFn, decltype(&::ncclCommDestroy)>);
static_assert(std::is_same_v<GetErrorStringFn, decltype(&::ncclGetErrorString)>);
static_assert(std::is_same_v<GetLastErrorFn, decltype(&::ncclGetLastError)>);
static_assert(std::is_same_v<AllReduceFn, decltype(&::ncclAllReduce)>);
static_assert(std::is_same_v<BroadcastFn, decltype(&::ncclBroadcast)>);
static_assert(std::is_same_v<AllGatherFn, decltype(&::ncclAllGather)>);
static_assert(std::is_same_v<SendFn, decltype(&::ncclSend)>);
static_assert(std::is_same_v<RecvFn, decltype(&::ncclRecv)>);
static_assert(std::is_same_v<GroupFn, decltype(&::ncclGroupStart)>);
static_assert(std::is_same_v<GroupFn, decltype(&::ncclGroupEnd)>);
static_assert(std::is_same_v<CudaIntFn, decltype(&::cudaSetDevice)>);
static_assert(std::is_same_v<CudaIntPtrFn, decltype(&::cudaGetDevice)>);
static_assert(std::is_same_v<CudaIntPtrFn, decltype(&::cudaGetDeviceCount)>);
static_assert(std::is_same_v<CudaIntPtrFn, decltype(&::cudaRuntimeGetVersion)>);
static_assert(std::is_same_v<CudaStreamCreateFn, decltype(&::cudaStreamCreate)>);
static_assert(std::is_same_v<CudaStreamFn, decltype(&::cudaStreamDestroy)>);
static_assert(std::is_same_v<CudaStreamFn, decltype(&::cudaStreamSynchronize)>);
static_assert(std::is_same_v<CudaErrorStringFn, decltype(&::cudaGetErrorString)>);
// (C++ also sees an overload with flags: pick ours, which fails to compile if it is absent)
[[maybe_unused]] constexpr CudaEventCreateFn kCheckEventCreate = &::cudaEventCreate;
static_assert(std::is_same_v<CudaEventRecordFn, decltype(&::cudaEventRecord)>);
static_assert(std::is_same_v<CudaEventFn, decltype(&::cudaEventSynchronize)>);
static_assert(std::is_same_v<CudaEventFn, decltype(&::cudaEventDestroy)>);
static_assert(std::is_same_v<CudaEventElapsedFn, decltype(&::cudaEventElapsedTime)>);
#endif
}  // namespace api

// ------------------------------------------------------------------------------------------
// Opening libnccl and libcudart (process-wide, once)
// ------------------------------------------------------------------------------------------

struct Libs {
  void* nccl = nullptr;
  void* cudart = nullptr;
  std::string nccl_path, cudart_path;  // what was opened (from dladdr: the real file)
  int nccl_version = 0, cudart_version = 0;

  api::GetVersionFn GetVersion = nullptr;
  api::GetUniqueIdFn GetUniqueId = nullptr;
  api::CommInitRankFn CommInitRank = nullptr;
  api::CommSplitFn CommSplit = nullptr;
  api::CommDestroyFn CommDestroy = nullptr;
  api::GetErrorStringFn GetErrorString = nullptr;
  api::GetLastErrorFn GetLastError = nullptr;
  api::AllReduceFn AllReduce = nullptr;
  api::BroadcastFn Broadcast = nullptr;
  api::AllGatherFn AllGather = nullptr;
  api::SendFn Send = nullptr;
  api::RecvFn Recv = nullptr;
  api::GroupFn GroupStart = nullptr;
  api::GroupFn GroupEnd = nullptr;

  api::CudaIntFn SetDevice = nullptr;
  api::CudaIntPtrFn GetDevice = nullptr;
  api::CudaIntPtrFn GetDeviceCount = nullptr;
  api::CudaIntPtrFn RuntimeGetVersion = nullptr;
  api::CudaStreamCreateFn StreamCreate = nullptr;
  api::CudaStreamFn StreamDestroy = nullptr;
  api::CudaStreamFn StreamSynchronize = nullptr;
  api::CudaErrorStringFn CudaErrorString = nullptr;
  api::CudaEventCreateFn EventCreate = nullptr;
  api::CudaEventRecordFn EventRecord = nullptr;
  api::CudaEventFn EventSynchronize = nullptr;
  api::CudaEventFn EventDestroy = nullptr;
  api::CudaEventElapsedFn EventElapsedTime = nullptr;
};

std::mutex g_libs_mutex;
Libs* g_libs = nullptr;  // set once, never freed (the libraries stay loaded)

std::string PathOf(void* symbol, const std::string& fallback) {
  Dl_info info;
  if (symbol != nullptr && dladdr(symbol, &info) != 0 && info.dli_fname != nullptr) {
    return info.dli_fname;
  }
  return fallback;
}

/*!
 * \brief dlopen the first candidate that loads.  Candidates already loaded in the process are
 * preferred (RTLD_NOLOAD), so the plugin shares libcudart with TVM's CUDA runtime and libnccl
 * with e.g. PyTorch.  Returns nullptr and appends the reasons to `why` if none loads.
 */
void* OpenFirst(const std::vector<std::string>& candidates, std::string* opened, std::string* why) {
  for (int pass = 0; pass < 2; ++pass) {
    for (const std::string& c : candidates) {
      if (c.empty()) continue;
      int flags = RTLD_NOW | RTLD_LOCAL | (pass == 0 ? RTLD_NOLOAD : 0);
      void* h = dlopen(c.c_str(), flags);
      if (h != nullptr) {
        *opened = c;
        return h;
      }
      if (pass == 1) {
        const char* err = dlerror();
        *why += "\n    " + c + ": " + (err ? err : "not found");
      } else {
        dlerror();
      }
    }
  }
  return nullptr;
}

template <typename Fn>
void Bind(void* lib, const char* name, Fn* out, const std::string& lib_name) {
  dlerror();
  void* sym = dlsym(lib, name);
  if (sym == nullptr) {
    CCL_ERROR << lib_name << " has no symbol " << name << " (too old a version?)";
  }
  *out = reinterpret_cast<Fn>(sym);
}

/*!
 * \brief Open libnccl and libcudart (once per process).  `nccl_hint` / `cudart_hint` are full
 * paths found by the Python side (may be empty); $MLC_NCCL_LIBRARY / $MLC_CUDART_LIBRARY win.
 */
Libs* GetLibs(const std::string& nccl_hint = "", const std::string& cudart_hint = "") {
  std::lock_guard<std::mutex> lock(g_libs_mutex);
  if (g_libs != nullptr) return g_libs;
  auto libs = std::make_unique<Libs>();
  const char* env_nccl = std::getenv("MLC_NCCL_LIBRARY");
  const char* env_cudart = std::getenv("MLC_CUDART_LIBRARY");
  std::string opened, why;

  std::vector<std::string> cudart_candidates = {env_cudart ? env_cudart : "", "libcudart.so.13",
                                                cudart_hint, "libcudart.so.12", "libcudart.so"};
  libs->cudart = OpenFirst(cudart_candidates, &opened, &why);
  if (libs->cudart == nullptr) {
    CCL_ERROR << "cannot open the CUDA runtime (libcudart). Tried:" << why
              << "\n  Put its folder on LD_LIBRARY_PATH or set MLC_CUDART_LIBRARY to the file.";
  }
  const std::string cudart_name = "libcudart";
  Bind(libs->cudart, "cudaSetDevice", &libs->SetDevice, cudart_name);
  Bind(libs->cudart, "cudaGetDevice", &libs->GetDevice, cudart_name);
  Bind(libs->cudart, "cudaGetDeviceCount", &libs->GetDeviceCount, cudart_name);
  Bind(libs->cudart, "cudaRuntimeGetVersion", &libs->RuntimeGetVersion, cudart_name);
  Bind(libs->cudart, "cudaStreamCreate", &libs->StreamCreate, cudart_name);
  Bind(libs->cudart, "cudaStreamDestroy", &libs->StreamDestroy, cudart_name);
  Bind(libs->cudart, "cudaStreamSynchronize", &libs->StreamSynchronize, cudart_name);
  Bind(libs->cudart, "cudaGetErrorString", &libs->CudaErrorString, cudart_name);
  Bind(libs->cudart, "cudaEventCreate", &libs->EventCreate, cudart_name);
  Bind(libs->cudart, "cudaEventRecord", &libs->EventRecord, cudart_name);
  Bind(libs->cudart, "cudaEventSynchronize", &libs->EventSynchronize, cudart_name);
  Bind(libs->cudart, "cudaEventDestroy", &libs->EventDestroy, cudart_name);
  Bind(libs->cudart, "cudaEventElapsedTime", &libs->EventElapsedTime, cudart_name);
  libs->cudart_path = PathOf(reinterpret_cast<void*>(libs->SetDevice), opened);
  libs->RuntimeGetVersion(&libs->cudart_version);

  why.clear();
  std::vector<std::string> nccl_candidates = {env_nccl ? env_nccl : "", nccl_hint,
                                              "libnccl.so.2", "libnccl.so"};
  libs->nccl = OpenFirst(nccl_candidates, &opened, &why);
  if (libs->nccl == nullptr) {
    CCL_ERROR << "cannot open NCCL (libnccl.so.2). Tried:" << why
              << "\n  Install it (pip install nvidia-nccl-cu13; PyTorch's CUDA wheels bring it "
                 "too), put its folder on LD_LIBRARY_PATH, or set MLC_NCCL_LIBRARY to the file.";
  }
  const std::string nccl_name = "libnccl";
  Bind(libs->nccl, "ncclGetVersion", &libs->GetVersion, nccl_name);
  Bind(libs->nccl, "ncclGetUniqueId", &libs->GetUniqueId, nccl_name);
  Bind(libs->nccl, "ncclCommInitRank", &libs->CommInitRank, nccl_name);
  Bind(libs->nccl, "ncclCommSplit", &libs->CommSplit, nccl_name);
  Bind(libs->nccl, "ncclCommDestroy", &libs->CommDestroy, nccl_name);
  Bind(libs->nccl, "ncclGetErrorString", &libs->GetErrorString, nccl_name);
  Bind(libs->nccl, "ncclGetLastError", &libs->GetLastError, nccl_name);
  Bind(libs->nccl, "ncclAllReduce", &libs->AllReduce, nccl_name);
  Bind(libs->nccl, "ncclBroadcast", &libs->Broadcast, nccl_name);
  Bind(libs->nccl, "ncclAllGather", &libs->AllGather, nccl_name);
  Bind(libs->nccl, "ncclSend", &libs->Send, nccl_name);
  Bind(libs->nccl, "ncclRecv", &libs->Recv, nccl_name);
  Bind(libs->nccl, "ncclGroupStart", &libs->GroupStart, nccl_name);
  Bind(libs->nccl, "ncclGroupEnd", &libs->GroupEnd, nccl_name);
  libs->nccl_path = PathOf(reinterpret_cast<void*>(libs->GetVersion), opened);
  libs->GetVersion(&libs->nccl_version);
  g_libs = libs.release();
  return g_libs;
}

// ------------------------------------------------------------------------------------------
// Error checks
// ------------------------------------------------------------------------------------------

#define NCCL_CHECK(what, comm, call)                                                      \
  do {                                                                                    \
    api::Result r_ = (call);                                                              \
    if (static_cast<int>(r_) != api::kSuccess) {                                          \
      Libs* l_ = g_libs;                                                                  \
      const char* last_ = (l_ && l_->GetLastError) ? l_->GetLastError(comm) : nullptr;    \
      CCL_ERROR << what << ": NCCL error " << static_cast<int>(r_) << " ("                \
                << (l_ ? l_->GetErrorString(r_) : "?") << ")"                             \
                << ((last_ && *last_) ? std::string(": ") + last_ : std::string());       \
    }                                                                                     \
  } while (0)

#define CUDA_CHECK(what, call)                                                      \
  do {                                                                              \
    api::CudaError e_ = (call);                                                     \
    if (static_cast<int>(e_) != api::kSuccess) {                                    \
      CCL_ERROR << what << ": CUDA error " << static_cast<int>(e_) << " ("          \
                << g_libs->CudaErrorString(e_) << ")";                              \
    }                                                                               \
  } while (0)

api::DataType AsNcclType(DLDataType t) {
  if (t.lanes != 1) CCL_ERROR << "vector dtypes (lanes=" << t.lanes << ") are not supported";
  int k = -1;
  if (t.code == kDLInt && t.bits == 8) k = api::kInt8;
  if (t.code == kDLUInt && t.bits == 8) k = api::kUint8;
  if (t.code == kDLBool && t.bits == 8) k = api::kUint8;
  if (t.code == kDLInt && t.bits == 32) k = api::kInt32;
  if (t.code == kDLUInt && t.bits == 32) k = api::kUint32;
  if (t.code == kDLInt && t.bits == 64) k = api::kInt64;
  if (t.code == kDLUInt && t.bits == 64) k = api::kUint64;
  if (t.code == kDLFloat && t.bits == 16) k = api::kFloat16;
  if (t.code == kDLFloat && t.bits == 32) k = api::kFloat32;
  if (t.code == kDLFloat && t.bits == 64) k = api::kFloat64;
  if (t.code == kDLBfloat && t.bits == 16) k = api::kBfloat16;
  if (k < 0) {
    CCL_ERROR << "dtype (code " << static_cast<int>(t.code) << ", " << static_cast<int>(t.bits)
              << " bits) has no NCCL equivalent";
  }
  return static_cast<api::DataType>(k);
}

api::RedOp AsNcclOp(int kind) {
  switch (static_cast<ReduceKind>(kind)) {
    case ReduceKind::kSum: return static_cast<api::RedOp>(api::kOpSum);
    case ReduceKind::kProd: return static_cast<api::RedOp>(api::kOpProd);
    case ReduceKind::kMin: return static_cast<api::RedOp>(api::kOpMin);
    case ReduceKind::kMax: return static_cast<api::RedOp>(api::kOpMax);
    case ReduceKind::kAvg: return static_cast<api::RedOp>(api::kOpAvg);
  }
  CCL_ERROR << "unknown reduce kind " << kind << " (0 sum, 1 prod, 2 min, 3 max, 4 avg)";
  throw;
}

int64_t Numel(const Tensor& t) {
  int64_t n = 1;
  for (int i = 0; i < t->ndim; ++i) n *= t->shape[i];
  return n;
}

void* DataPtr(const Tensor& t) { return static_cast<char*>(t->data) + t->byte_offset; }

void CheckCuda(const Tensor& t, const char* op, const char* arg) {
  if (t->device.device_type != kDLCUDA) {
    CCL_ERROR << op << ": `" << arg << "` must be a CUDA tensor (device type "
              << static_cast<int>(t->device.device_type) << ")";
  }
}

// ------------------------------------------------------------------------------------------
// Per-worker context (thread-local: a ThreadedSession runs every worker in one process)
// ------------------------------------------------------------------------------------------

struct Context {
  DiscoWorker* worker = nullptr;
  int worker_id = 0, num_workers = 1, num_groups = 1, group_size = 1;
  int device_id = 0;
  api::Stream own_stream = nullptr;
  api::Comm global_comm = nullptr;
  api::Comm group_comm = nullptr;  // == global_comm when num_groups == 1

  ~Context() { Release(); }

  void Release() {
    Libs* l = g_libs;
    if (l == nullptr) return;
    // Best effort: never throw from here (it runs at thread exit).
    int prev = -1;
    l->GetDevice(&prev);
    l->SetDevice(device_id);
    if (group_comm != nullptr && group_comm != global_comm) l->CommDestroy(group_comm);
    if (global_comm != nullptr) l->CommDestroy(global_comm);
    if (own_stream != nullptr) l->StreamDestroy(own_stream);
    if (prev >= 0) l->SetDevice(prev);
    group_comm = global_comm = nullptr;
    own_stream = nullptr;
  }

  /*! \brief The stream a collective is enqueued on now (see "Streams" at the top). */
  api::Stream stream() const {
    void* s = TVMFFIEnvGetStream(kDLCUDA, device_id);
    return s != nullptr ? static_cast<api::Stream>(s) : own_stream;
  }
  api::Comm comm(bool in_group) const { return in_group ? group_comm : global_comm; }
  bool is_root(bool in_group) const {
    return in_group ? (worker_id % group_size == 0) : (worker_id == 0);
  }
  int nranks(bool in_group) const { return in_group ? group_size : num_workers; }
};

thread_local std::unique_ptr<Context> tls_context;

Context* Ctx(const char* op) {
  Context* ctx = tls_context.get();
  if (ctx == nullptr || ctx->global_comm == nullptr) {
    CCL_ERROR << op << ": this thread has no " MLC_CCL_NAME
              << " communicator (call init_ccl first; is this a disco worker?)";
  }
  return ctx;
}

// ------------------------------------------------------------------------------------------
// Initialisation
// ------------------------------------------------------------------------------------------

std::mutex g_config_mutex;
std::string g_nccl_hint, g_cudart_hint;  // set by `configure` before init_ccl (controller)
bool g_disable_nvls = true;

/*! \brief Controller side: one unique id for the session, handed to every worker. */
void InitCCL(Session sess, ffi::Shape device_ids) {
  std::string nccl_hint, cudart_hint;
  bool disable_nvls;
  {
    std::lock_guard<std::mutex> lock(g_config_mutex);
    nccl_hint = g_nccl_hint;
    cudart_hint = g_cudart_hint;
    disable_nvls = g_disable_nvls;
  }
  int num_workers = static_cast<int>(sess->GetNumWorkers());
  if (!device_ids.empty() && static_cast<int>(device_ids.size()) != num_workers) {
    CCL_ERROR << "init_ccl: got " << device_ids.size() << " device ids for " << num_workers
              << " workers";
  }
  if (disable_nvls) setenv("NCCL_NVLS_ENABLE", "0", /*overwrite=*/0);
  Libs* libs = GetLibs(nccl_hint, cudart_hint);
  api::UniqueId id;
  NCCL_CHECK("ncclGetUniqueId", nullptr, libs->GetUniqueId(&id));
  ffi::Bytes id_bytes(reinterpret_cast<const char*>(&id), api::kUniqueIdBytes);
  DRef func = sess->GetGlobalFunc("runtime.disco." MLC_CCL_NAME ".init_ccl_per_worker");
  // Workers open the libraries the controller opened (same files, same versions).
  sess->CallPacked(func, device_ids, id_bytes, ffi::String(libs->nccl_path),
                   ffi::String(libs->cudart_path), disable_nvls);
  for (int i = 0; i < num_workers; ++i) sess->SyncWorker(i);  // surfaces a worker's error
}

/*! \brief Worker side: device, stream, communicator(s); makes this the worker's CCL. */
void InitCCLPerWorker(ffi::Shape device_ids, ffi::Bytes id_bytes, ffi::String nccl_path,
                      ffi::String cudart_path, bool disable_nvls) {
  DiscoWorker* worker = DiscoWorker::ThreadLocal();
  if (worker == nullptr) CCL_ERROR << "init_ccl_per_worker must run on a disco worker";
  if (id_bytes.size() != static_cast<size_t>(api::kUniqueIdBytes)) {
    CCL_ERROR << "init_ccl_per_worker: the unique id has " << id_bytes.size() << " bytes, not "
              << api::kUniqueIdBytes;
  }
  if (disable_nvls) setenv("NCCL_NVLS_ENABLE", "0", /*overwrite=*/0);
  Libs* libs = GetLibs(std::string(nccl_path), std::string(cudart_path));

  auto ctx = std::make_unique<Context>();
  ctx->worker = worker;
  ctx->worker_id = worker->worker_id;
  ctx->num_workers = worker->num_workers;
  ctx->num_groups = worker->num_groups;
  if (ctx->num_groups <= 0 || ctx->num_workers % ctx->num_groups != 0) {
    CCL_ERROR << ctx->num_workers << " workers cannot form " << ctx->num_groups << " groups";
  }
  ctx->group_size = ctx->num_workers / ctx->num_groups;
  ctx->device_id = device_ids.empty() ? worker->local_worker_id
                                      : static_cast<int>(device_ids[worker->local_worker_id]);
  int count = 0;
  CUDA_CHECK("cudaGetDeviceCount", libs->GetDeviceCount(&count));
  if (ctx->device_id < 0 || ctx->device_id >= count) {
    CCL_ERROR << "worker " << ctx->worker_id << " was given cuda:" << ctx->device_id << " but "
              << count << " GPU(s) are visible";
  }
  DLDevice dev{kDLCUDA, ctx->device_id};
  if (worker->default_device.device_type == kDLCPU) {
    worker->default_device = dev;
  } else if (worker->default_device.device_type != kDLCUDA ||
             worker->default_device.device_id != ctx->device_id) {
    CCL_ERROR << "worker " << ctx->worker_id << " already uses device (type "
              << static_cast<int>(worker->default_device.device_type) << ", id "
              << worker->default_device.device_id << "), not cuda:" << ctx->device_id;
  }
  CUDA_CHECK("cudaSetDevice", libs->SetDevice(ctx->device_id));
  CUDA_CHECK("cudaStreamCreate", libs->StreamCreate(&ctx->own_stream));
  api::UniqueId id;
  std::memcpy(&id, id_bytes.data(), api::kUniqueIdBytes);
  NCCL_CHECK("ncclCommInitRank", nullptr,
             libs->CommInitRank(&ctx->global_comm, ctx->num_workers, id, ctx->worker_id));
  if (ctx->num_groups == 1) {
    ctx->group_comm = ctx->global_comm;
  } else {
    NCCL_CHECK("ncclCommSplit", ctx->global_comm,
               libs->CommSplit(ctx->global_comm, ctx->worker_id / ctx->group_size,
                               ctx->worker_id % ctx->group_size, &ctx->group_comm, nullptr));
  }
  tls_context = std::move(ctx);  // replaces (and destroys) a previous communicator, if any
  worker->ccl = MLC_CCL_NAME;
}

// ------------------------------------------------------------------------------------------
// Collectives
// ------------------------------------------------------------------------------------------

void AllReduce(Tensor send, int kind, bool in_group, Tensor recv) {
  Context* ctx = Ctx("allreduce");
  CheckCuda(send, "allreduce", "send");
  CheckCuda(recv, "allreduce", "recv");
  int64_t n = Numel(send);
  if (Numel(recv) != n) CCL_ERROR << "allreduce: send has " << n << " elements, recv " << Numel(recv);
  api::Comm comm = ctx->comm(in_group);
  NCCL_CHECK("ncclAllReduce", comm,
             g_libs->AllReduce(DataPtr(send), DataPtr(recv), static_cast<size_t>(n),
                               AsNcclType(send->dtype), AsNcclOp(kind), comm, ctx->stream()));
}

void AllGather(Tensor send, bool in_group, Tensor recv) {
  Context* ctx = Ctx("allgather");
  CheckCuda(send, "allgather", "send");
  CheckCuda(recv, "allgather", "recv");
  int64_t n = Numel(send);
  if (Numel(recv) != n * ctx->nranks(in_group)) {
    CCL_ERROR << "allgather: recv must hold " << ctx->nranks(in_group) << " x " << n
              << " elements, it holds " << Numel(recv);
  }
  api::Comm comm = ctx->comm(in_group);
  NCCL_CHECK("ncclAllGather", comm,
             g_libs->AllGather(DataPtr(send), DataPtr(recv), static_cast<size_t>(n),
                               AsNcclType(send->dtype), comm, ctx->stream()));
}

void BroadcastFromWorker0(ffi::Optional<Tensor> send, bool in_group, Tensor recv) {
  Context* ctx = Ctx("broadcast_from_worker0");
  CheckCuda(recv, "broadcast_from_worker0", "recv");
  const void* src = nullptr;
  if (ctx->is_root(in_group)) {
    if (!send.has_value()) CCL_ERROR << "broadcast_from_worker0: the sender needs `send`";
    Tensor s = send.value();
    CheckCuda(s, "broadcast_from_worker0", "send");
    if (Numel(s) != Numel(recv)) {
      CCL_ERROR << "broadcast_from_worker0: send has " << Numel(s) << " elements, recv "
                << Numel(recv);
    }
    src = DataPtr(s);
  }
  api::Comm comm = ctx->comm(in_group);
  NCCL_CHECK("ncclBroadcast", comm,
             g_libs->Broadcast(src, DataPtr(recv), static_cast<size_t>(Numel(recv)),
                               AsNcclType(recv->dtype), /*root=*/0, comm, ctx->stream()));
}

size_t ElemBytes(DLDataType t) { return (static_cast<size_t>(t.bits) * t.lanes + 7) / 8; }

void ScatterFromWorker0(ffi::Optional<Tensor> send, bool in_group, Tensor recv) {
  Context* ctx = Ctx("scatter_from_worker0");
  CheckCuda(recv, "scatter_from_worker0", "recv");
  api::Comm comm = ctx->comm(in_group);
  api::Stream stream = ctx->stream();
  int n = ctx->nranks(in_group);
  int64_t per = Numel(recv);
  api::DataType dt = AsNcclType(recv->dtype);
  const char* base = nullptr;
  size_t bytes = 0;
  if (ctx->is_root(in_group)) {  // validate before the NCCL group opens
    if (!send.has_value()) CCL_ERROR << "scatter_from_worker0: the sender needs `send`";
    Tensor s = send.value();
    CheckCuda(s, "scatter_from_worker0", "send");
    if (Numel(s) != per * n) {
      CCL_ERROR << "scatter_from_worker0: send has " << Numel(s) << " elements, expected "
                << n << " x " << per;
    }
    base = static_cast<const char*>(DataPtr(s));
    bytes = static_cast<size_t>(per) * ElemBytes(s->dtype);
  }
  NCCL_CHECK("ncclGroupStart", comm, g_libs->GroupStart());
  for (int r = 0; base != nullptr && r < n; ++r) {
    NCCL_CHECK("ncclSend", comm,
               g_libs->Send(base + r * bytes, static_cast<size_t>(per), dt, r, comm, stream));
  }
  NCCL_CHECK("ncclRecv", comm,
             g_libs->Recv(DataPtr(recv), static_cast<size_t>(per), dt, 0, comm, stream));
  NCCL_CHECK("ncclGroupEnd", comm, g_libs->GroupEnd());
}

void GatherToWorker0(Tensor send, bool in_group, ffi::Optional<Tensor> recv) {
  Context* ctx = Ctx("gather_to_worker0");
  CheckCuda(send, "gather_to_worker0", "send");
  api::Comm comm = ctx->comm(in_group);
  api::Stream stream = ctx->stream();
  int n = ctx->nranks(in_group);
  int64_t per = Numel(send);
  api::DataType dt = AsNcclType(send->dtype);
  char* base = nullptr;
  size_t bytes = 0;
  if (ctx->is_root(in_group)) {  // validate before the NCCL group opens
    if (!recv.has_value()) CCL_ERROR << "gather_to_worker0: the receiver needs `recv`";
    Tensor r = recv.value();
    CheckCuda(r, "gather_to_worker0", "recv");
    if (Numel(r) != per * n) {
      CCL_ERROR << "gather_to_worker0: recv has " << Numel(r) << " elements, expected " << n
                << " x " << per;
    }
    base = static_cast<char*>(DataPtr(r));
    bytes = static_cast<size_t>(per) * ElemBytes(r->dtype);
  }
  NCCL_CHECK("ncclGroupStart", comm, g_libs->GroupStart());
  for (int k = 0; base != nullptr && k < n; ++k) {
    NCCL_CHECK("ncclRecv", comm,
               g_libs->Recv(base + k * bytes, static_cast<size_t>(per), dt, k, comm, stream));
  }
  NCCL_CHECK("ncclSend", comm,
             g_libs->Send(DataPtr(send), static_cast<size_t>(per), dt, 0, comm, stream));
  NCCL_CHECK("ncclGroupEnd", comm, g_libs->GroupEnd());
}

void SendTo(Context* ctx, const char* op, Tensor buffer, int peer) {
  CheckCuda(buffer, op, "buffer");
  if (peer < 0 || peer >= ctx->num_workers || peer == ctx->worker_id) {
    CCL_ERROR << op << ": worker " << ctx->worker_id << " cannot send to worker " << peer;
  }
  NCCL_CHECK("ncclSend", ctx->global_comm,
             g_libs->Send(DataPtr(buffer), static_cast<size_t>(Numel(buffer)),
                          AsNcclType(buffer->dtype), peer, ctx->global_comm, ctx->stream()));
}

void RecvFrom(Context* ctx, const char* op, Tensor buffer, int peer) {
  CheckCuda(buffer, op, "buffer");
  if (peer < 0 || peer >= ctx->num_workers || peer == ctx->worker_id) {
    CCL_ERROR << op << ": worker " << ctx->worker_id << " cannot receive from worker " << peer;
  }
  NCCL_CHECK("ncclRecv", ctx->global_comm,
             g_libs->Recv(DataPtr(buffer), static_cast<size_t>(Numel(buffer)),
                          AsNcclType(buffer->dtype), peer, ctx->global_comm, ctx->stream()));
}

void RecvFromWorker0(Tensor buffer) {
  RecvFrom(Ctx("recv_from_worker0"), "recv_from_worker0", buffer, 0);
}

void SendToWorker(Tensor buffer, int64_t receiver) {
  SendTo(Ctx("send_to_worker"), "send_to_worker", buffer, static_cast<int>(receiver));
}

void RecvFromWorker(Tensor buffer, int64_t sender) {
  RecvFrom(Ctx("recv_from_worker"), "recv_from_worker", buffer, static_cast<int>(sender));
}

void SendToNextGroup(Tensor buffer) {
  Context* ctx = Ctx("send_to_next_group");
  SendTo(ctx, "send_to_next_group", buffer, ctx->worker_id + ctx->group_size);
}

void RecvFromPrevGroup(Tensor buffer) {
  Context* ctx = Ctx("recv_from_prev_group");
  RecvFrom(ctx, "recv_from_prev_group", buffer, ctx->worker_id - ctx->group_size);
}

void SyncWorker() {
  Context* ctx = Ctx("sync_worker");
  CUDA_CHECK("cudaStreamSynchronize", g_libs->StreamSynchronize(ctx->stream()));
}

/*! \brief In-worker timing of `iters` back-to-back sum all-reduces (CUDA events). */
double BenchAllReduce(Tensor buffer, int64_t iters) {
  Context* ctx = Ctx("debug_bench_allreduce");
  Libs* l = g_libs;
  api::Stream s = ctx->stream();
  api::Event e0 = nullptr, e1 = nullptr;
  CUDA_CHECK("cudaEventCreate", l->EventCreate(&e0));
  CUDA_CHECK("cudaEventCreate", l->EventCreate(&e1));
  CUDA_CHECK("cudaEventRecord", l->EventRecord(e0, s));
  for (int64_t i = 0; i < iters; ++i) {
    AllReduce(buffer, static_cast<int>(ReduceKind::kSum), false, buffer);
  }
  CUDA_CHECK("cudaEventRecord", l->EventRecord(e1, s));
  CUDA_CHECK("cudaEventSynchronize", l->EventSynchronize(e1));
  float ms = 0;
  CUDA_CHECK("cudaEventElapsedTime", l->EventElapsedTime(&ms, e0, e1));
  l->EventDestroy(e0);
  l->EventDestroy(e1);
  return ms * 1e-3 / static_cast<double>(iters > 0 ? iters : 1);
}

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef()
      // --- the CCL contract used by TVM's disco builtins (runtime.disco.allreduce, ...) ---
      .def("runtime.disco." MLC_CCL_NAME ".init_ccl", InitCCL)
      .def("runtime.disco." MLC_CCL_NAME ".init_ccl_per_worker", InitCCLPerWorker)
      .def("runtime.disco." MLC_CCL_NAME ".allreduce", AllReduce)
      .def("runtime.disco." MLC_CCL_NAME ".allgather", AllGather)
      .def("runtime.disco." MLC_CCL_NAME ".broadcast_from_worker0", BroadcastFromWorker0)
      .def("runtime.disco." MLC_CCL_NAME ".scatter_from_worker0", ScatterFromWorker0)
      .def("runtime.disco." MLC_CCL_NAME ".gather_to_worker0", GatherToWorker0)
      .def("runtime.disco." MLC_CCL_NAME ".recv_from_worker0", RecvFromWorker0)
      .def("runtime.disco." MLC_CCL_NAME ".send_to_next_group", SendToNextGroup)
      .def("runtime.disco." MLC_CCL_NAME ".recv_from_prev_group", RecvFromPrevGroup)
      .def("runtime.disco." MLC_CCL_NAME ".send_to_worker", SendToWorker)
      .def("runtime.disco." MLC_CCL_NAME ".recv_from_worker", RecvFromWorker)
      .def("runtime.disco." MLC_CCL_NAME ".sync_worker", SyncWorker)
      // --- helpers of this library ---
      // Paths the controller should try for libnccl / libcudart, and whether to switch NVLink
      // SHARP (multicast) off when NCCL_NVLS_ENABLE is unset; read by the next init_ccl.
      .def("runtime.disco." MLC_CCL_NAME ".configure",
           [](ffi::String nccl_hint, ffi::String cudart_hint, bool disable_nvls) {
             std::lock_guard<std::mutex> lock(g_config_mutex);
             g_nccl_hint = nccl_hint;
             g_cudart_hint = cudart_hint;
             g_disable_nvls = disable_nvls;
           })
      // Opens the libraries in this process (if not yet) and describes them: a string
      // "nccl=<version> <path>; cudart=<version> <path>". Throws with the search list if missing.
      .def("runtime.disco." MLC_CCL_NAME ".library_info",
           [](ffi::String nccl_hint, ffi::String cudart_hint) -> ffi::String {
             Libs* l = GetLibs(nccl_hint, cudart_hint);
             std::ostringstream os;
             os << "nccl=" << l->nccl_version << " " << l->nccl_path
                << "; cudart=" << l->cudart_version << " " << l->cudart_path;
             return os.str();
           })
      // Whether the build compiled against the real nccl.h / cuda_runtime_api.h.
      .def("runtime.disco." MLC_CCL_NAME ".built_with_headers",
           []() -> bool {
#ifdef MLC_NCCL_WITH_HEADERS
             return true;
#else
             return false;
#endif
           })
      // (worker_id, num_workers, num_groups, device_id) of the calling worker.
      .def("runtime.disco." MLC_CCL_NAME ".worker_info",
           []() -> ffi::Shape {
             Context* c = Ctx("worker_info");
             return ffi::Shape({c->worker_id, c->num_workers, c->num_groups, c->device_id});
           })
      .def("runtime.disco." MLC_CCL_NAME ".debug_send_recv",
           [](Tensor buffer, int64_t src, int64_t dst) {
             Context* c = Ctx("debug_send_recv");
             if (c->worker_id == src) SendTo(c, "debug_send_recv", buffer, static_cast<int>(dst));
             if (c->worker_id == dst) RecvFrom(c, "debug_send_recv", buffer, static_cast<int>(src));
           })
      .def("runtime.disco." MLC_CCL_NAME ".debug_bench_allreduce", BenchAllReduce);
}

}  // namespace nccl_ccl
}  // namespace mlc_course
