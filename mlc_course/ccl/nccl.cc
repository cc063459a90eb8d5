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
 * libcuda (the driver API: cuModuleLoadData, cuLaunchKernel) is opened the same way, only for
 * the one-shot all-reduce below.
 *
 * One-shot all-reduce over peer GPU memory
 * ----------------------------------------
 * Tensor-parallel decode at batch 1 all-reduces a few KB twice per layer; NCCL takes ~7-10 us
 * per such call even inside a CUDA graph.  For small sum all-reduces this library has a path
 * of its own: every rank owns one buffer that every other rank can write (CUDA IPC between
 * processes, peer access between threads of one process); a single kernel per call copies the
 * rank's vector into every rank's buffer over NVLink, raises a flag there, waits for the other
 * ranks' flags in its own buffer and sums the ranks' vectors locally, in float32 and in rank
 * order 0..N-1 (every rank gets bitwise the same result).  See kOneShotSource for the kernel
 * and its protocol (epochs in device memory, double buffering by epoch parity, system-scope
 * fences, a bounded wait).
 *   - When: op sum; float16, bfloat16 or float32; at most `max_bytes` (default 256 KiB,
 *     MLC_NCCL_ONESHOT_MAX_BYTES); the global communicator (or one group); 2..8 ranks, all
 *     GPUs of this host with peer access to each other; set up at init without error.
 *     Anything else goes to ncclAllReduce as before.  MLC_NCCL_ONESHOT=0 switches it off.
 *   - Setup (init_ccl_per_worker): the *controller* compiles kOneShotSource once through the
 *     global callback `tvm_callback_cuda_compile` (the one TVM calls for its own kernels; it
 *     returns a cubin/fatbin) and hands the binary to every worker; each worker loads it with
 *     cuModuleLoadData, allocates its buffer, per-block epoch counters and a mapped host error
 *     word, and the workers exchange buffer handles, pids, PCI ids and host ids with two
 *     ncclAllGather calls.  All ranks then agree: the path is on everywhere or nowhere.  Any
 *     failure (no callback, compile error, no peer access, ...) leaves NCCL in charge, and
 *     `debug_allreduce_path` says why.
 *   - CUDA graphs: the kernel is launched on the stream NCCL would use (see Streams); it does no
 *     host synchronisation or allocation; its epoch lives in device memory and is advanced by
 *     the kernel, so a replay of a captured call moves on by itself.
 *   - Programmatic dependent launch (PDL): on sm_90+ the kernel is launched with cuLaunchKernelEx
 *     and programmaticStreamSerializationAllowed, like the course's other decode kernels
 *     (cuda_device.py): it may start while the GEMV before it still runs and waits for it with
 *     griddepcontrol.wait before touching global memory, and it lets the kernel after it start
 *     early (griddepcontrol.launch_dependents, its first instruction).  Plain cuLaunchKernel on
 *     older GPUs, without cuLaunchKernelEx, or unless MLC_NCCL_ONESHOT_PDL=1 (read by the
 *     controller, handed to the workers; off by default: slower in decode, measured on 2x H200,
 *     Llama-2-70B TP=2 111.0 tok/s with it against 116.0 without); `debug_allreduce_path` says
 *     which ("pdl").
 *   - Never hangs: the wait gives up after `timeout_s` (default 30 s, MLC_NCCL_ONESHOT_TIMEOUT_S;
 *     a generous default because a peer may legitimately be seconds behind, e.g. still
 *     uploading weights before its first collective), writes an error word to mapped host
 *     memory and an abort word into every rank's buffer (later calls skip at once), and the
 *     next allreduce or sync_worker on the host throws an error that says what happened.
 *   - Assumption: a worker's collectives run one after the other (one stream, or the host
 *     synchronised between streams), as NCCL's do.
 */
#include <dlfcn.h>
#include <unistd.h>
#include <dlpack/dlpack.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/reflection/registry.h>
#include <tvm/ffi/string.h>
#include <tvm/runtime/disco/builtin.h>
#include <tvm/runtime/disco/disco_worker.h>
#include <tvm/runtime/disco/session.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <cctype>
#include <fstream>
#include <optional>
#include <stdexcept>
#include <type_traits>
#include <vector>

#ifndef MLC_CCL_NAME
#define MLC_CCL_NAME "mlc_nccl"
#endif

#ifdef MLC_NCCL_WITH_HEADERS
#include <cuda.h>
#include <cuda_runtime_api.h>
#include <nccl.h>
#endif
// MLC_NCCL_CHECK_DRIVER_ABI: a build (or a syntax check, see tests/test_ccl_nccl.py) with the
// real cuda.h but without nccl.h: checks the launch structs declared below against cuda.h.
#if defined(MLC_NCCL_WITH_HEADERS) || defined(MLC_NCCL_CHECK_DRIVER_ABI)
#include <cuda.h>
#define MLC_NCCL_HAVE_CUDA_H 1
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
using MemcpyKind = cudaMemcpyKind;
using DeviceAttr = cudaDeviceAttr;
using IpcMemHandle = cudaIpcMemHandle_t;
using CuResult = CUresult;
using CuModule = CUmodule;
using CuFunction = CUfunction;
using CuContext = CUcontext;
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
using MemcpyKind = int;  // cudaMemcpyKind
using DeviceAttr = int;  // cudaDeviceAttr
struct IpcMemHandle {    // cudaIpcMemHandle_t (passed by value: same ABI as the real struct)
  char reserved[64];
};
using CuResult = int;    // CUresult
struct CUmod_st;
using CuModule = CUmod_st*;
struct CUfunc_st;
using CuFunction = CUfunc_st*;
struct CUctx_st;
using CuContext = CUctx_st*;
#endif
constexpr int kIpcHandleBytes = 64;
constexpr int kMemcpyHostToDevice = 1, kMemcpyDeviceToHost = 2;     // cudaMemcpyKind
constexpr unsigned kHostAllocMapped = 2;                            // cudaHostAllocMapped
constexpr unsigned kIpcMemLazyEnablePeerAccess = 1;                 // cudaIpcMemLazyEnablePeerAccess
constexpr int kErrorPeerAccessAlreadyEnabled = 704;                 // cudaErrorPeerAccessAlreadyEnabled
constexpr int kDevAttrCcMajor = 75, kDevAttrCcMinor = 76;           // cudaDevAttrComputeCapability*

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
// (the one-shot all-reduce)
using CudaMallocFn = CudaError (*)(void**, size_t);
using CudaPtrFn = CudaError (*)(void*);
using CudaMemsetFn = CudaError (*)(void*, int, size_t);
using CudaMemcpyFn = CudaError (*)(void*, const void*, size_t, MemcpyKind);
using CudaHostAllocFn = CudaError (*)(void**, size_t, unsigned int);
using CudaHostGetDevicePointerFn = CudaError (*)(void**, void*, unsigned int);
using CudaIpcGetMemHandleFn = CudaError (*)(IpcMemHandle*, void*);
using CudaIpcOpenMemHandleFn = CudaError (*)(void**, IpcMemHandle, unsigned int);
using CudaDeviceCanAccessPeerFn = CudaError (*)(int*, int, int);
using CudaDeviceEnablePeerAccessFn = CudaError (*)(int, unsigned int);
using CudaDeviceGetPCIBusIdFn = CudaError (*)(char*, int, int);
using CudaDeviceGetByPCIBusIdFn = CudaError (*)(int*, const char*);
using CudaVoidFn = CudaError (*)();
using CudaDeviceGetAttributeFn = CudaError (*)(int*, DeviceAttr, int);
// CUDA driver API (libcuda)
using CuModuleLoadDataFn = CuResult (*)(CuModule*, const void*);
using CuModuleGetFunctionFn = CuResult (*)(CuFunction*, CuModule, const char*);
using CuModuleUnloadFn = CuResult (*)(CuModule);
using CuLaunchKernelFn = CuResult (*)(CuFunction, unsigned int, unsigned int, unsigned int,
                                      unsigned int, unsigned int, unsigned int, unsigned int,
                                      Stream, void**, void**);
using CuGetErrorStringFn = CuResult (*)(CuResult, const char**);
using CuCtxGetCurrentFn = CuResult (*)(CuContext*);
using CuCtxSetCurrentFn = CuResult (*)(CuContext);
using CuFuncGetAttributeFn = CuResult (*)(int*, int, CuFunction);  // (CUfunction_attribute: an enum)
constexpr int kFuncAttributePtxVersion = 5;  // CU_FUNC_ATTRIBUTE_PTX_VERSION

// cuLaunchKernelEx (driver API, CUDA 11.8+) and its two structs, declared here after the public
// driver ABI (cuda.h: CUlaunchAttribute, CUlaunchConfig) so that the plugin builds without
// cuda.h; with cuda.h the compiler checks them below.  Only the attribute used here is named.
constexpr int kLaunchAttributeProgrammaticStreamSerialization = 6;  // CU_LAUNCH_ATTRIBUTE_...
struct OwnLaunchAttribute {      // CUlaunchAttribute
  int id;                        // CUlaunchAttributeID (a C enum)
  char pad[4];                   // pad[8 - sizeof(CUlaunchAttributeID)]
  union alignas(8) {             // CUlaunchAttributeValue: 64 bytes, holds pointers
    char bytes[64];
    int programmaticStreamSerializationAllowed;
  } value;
};
struct OwnLaunchConfig {         // CUlaunchConfig
  unsigned int gridDimX, gridDimY, gridDimZ;
  unsigned int blockDimX, blockDimY, blockDimZ;
  unsigned int sharedMemBytes;
  Stream hStream;
  OwnLaunchAttribute* attrs;
  unsigned int numAttrs;
};
static_assert(sizeof(OwnLaunchAttribute) == 72 && alignof(OwnLaunchAttribute) == 8 &&
                  offsetof(OwnLaunchAttribute, value) == 8,
              "CUlaunchAttribute layout (LP64)");
static_assert(sizeof(OwnLaunchConfig) == 56 && offsetof(OwnLaunchConfig, sharedMemBytes) == 24 &&
                  offsetof(OwnLaunchConfig, hStream) == 32 && offsetof(OwnLaunchConfig, attrs) == 40 &&
                  offsetof(OwnLaunchConfig, numAttrs) == 48,
              "CUlaunchConfig layout (LP64)");
#ifdef MLC_NCCL_WITH_HEADERS
using LaunchAttribute = CUlaunchAttribute;
using LaunchConfig = CUlaunchConfig;
#else
using LaunchAttribute = OwnLaunchAttribute;
using LaunchConfig = OwnLaunchConfig;
#endif
using CuLaunchKernelExFn = CuResult (*)(const LaunchConfig*, CuFunction, void**, void**);

#ifdef MLC_NCCL_HAVE_CUDA_H
// The real cuda.h is here: the declarations above must match it field by field.
static_assert(sizeof(OwnLaunchAttribute) == sizeof(CUlaunchAttribute) &&
                  alignof(OwnLaunchAttribute) == alignof(CUlaunchAttribute) &&
                  offsetof(OwnLaunchAttribute, id) == offsetof(CUlaunchAttribute, id) &&
                  sizeof(OwnLaunchAttribute::id) == sizeof(CUlaunchAttribute::id) &&
                  offsetof(OwnLaunchAttribute, value) == offsetof(CUlaunchAttribute, value) &&
                  sizeof(OwnLaunchAttribute::value) == sizeof(CUlaunchAttribute::value),
              "CUlaunchAttribute layout");
static_assert(offsetof(CUlaunchAttributeValue, programmaticStreamSerializationAllowed) == 0 &&
                  sizeof(CUlaunchAttributeValue::programmaticStreamSerializationAllowed) == sizeof(int),
              "CUlaunchAttributeValue::programmaticStreamSerializationAllowed");
static_assert(sizeof(OwnLaunchConfig) == sizeof(CUlaunchConfig) &&
                  alignof(OwnLaunchConfig) == alignof(CUlaunchConfig) &&
                  offsetof(OwnLaunchConfig, gridDimX) == offsetof(CUlaunchConfig, gridDimX) &&
                  offsetof(OwnLaunchConfig, blockDimX) == offsetof(CUlaunchConfig, blockDimX) &&
                  offsetof(OwnLaunchConfig, blockDimZ) == offsetof(CUlaunchConfig, blockDimZ) &&
                  offsetof(OwnLaunchConfig, sharedMemBytes) == offsetof(CUlaunchConfig, sharedMemBytes) &&
                  offsetof(OwnLaunchConfig, hStream) == offsetof(CUlaunchConfig, hStream) &&
                  offsetof(OwnLaunchConfig, attrs) == offsetof(CUlaunchConfig, attrs) &&
                  offsetof(OwnLaunchConfig, numAttrs) == offsetof(CUlaunchConfig, numAttrs),
              "CUlaunchConfig layout");
static_assert(CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION ==
                  kLaunchAttributeProgrammaticStreamSerialization,
              "CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION");
static_assert(CU_FUNC_ATTRIBUTE_PTX_VERSION == kFuncAttributePtxVersion, "CU_FUNC_ATTRIBUTE_PTX_VERSION");
static_assert(sizeof(CUlaunchAttributeID) == sizeof(int) && sizeof(CUfunction_attribute) == sizeof(int),
              "driver API enums are passed as int");
static_assert(std::is_same_v<CUresult (*)(const CUlaunchConfig*, CUfunction, void**, void**),
                             decltype(&::cuLaunchKernelEx)>,
              "cuLaunchKernelEx");
static_assert(std::is_same_v<CUresult (*)(int*, CUfunction_attribute, CUfunction),
                             decltype(&::cuFuncGetAttribute)>,
              "cuFuncGetAttribute");
#endif

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
static_assert(sizeof(cudaIpcMemHandle_t) == kIpcHandleBytes, "cudaIpcMemHandle_t size");
static_assert(cudaMemcpyHostToDevice == kMemcpyHostToDevice &&
                  cudaMemcpyDeviceToHost == kMemcpyDeviceToHost,
              "cudaMemcpyKind");
static_assert(cudaHostAllocMapped == kHostAllocMapped, "cudaHostAllocMapped");
static_assert(cudaIpcMemLazyEnablePeerAccess == kIpcMemLazyEnablePeerAccess, "ipc flag");
static_assert(cudaErrorPeerAccessAlreadyEnabled == kErrorPeerAccessAlreadyEnabled, "error code");
static_assert(cudaDevAttrComputeCapabilityMajor == kDevAttrCcMajor &&
                  cudaDevAttrComputeCapabilityMinor == kDevAttrCcMinor,
              "cudaDeviceAttr");
static_assert(CUDA_SUCCESS == kSuccess, "CUresult");
static_assert(std::is_same_v<Stream, CUstream>, "a CUstream is a cudaStream_t");
[[maybe_unused]] constexpr CudaMallocFn kCheckMalloc = &::cudaMalloc;
static_assert(std::is_same_v<CudaPtrFn, decltype(&::cudaFree)>);
static_assert(std::is_same_v<CudaPtrFn, decltype(&::cudaFreeHost)>);
static_assert(std::is_same_v<CudaPtrFn, decltype(&::cudaIpcCloseMemHandle)>);
static_assert(std::is_same_v<CudaMemsetFn, decltype(&::cudaMemset)>);
static_assert(std::is_same_v<CudaMemcpyFn, decltype(&::cudaMemcpy)>);
[[maybe_unused]] constexpr CudaHostAllocFn kCheckHostAlloc = &::cudaHostAlloc;
[[maybe_unused]] constexpr CudaHostGetDevicePointerFn kCheckHostGetDevicePointer =
    &::cudaHostGetDevicePointer;
static_assert(std::is_same_v<CudaIpcGetMemHandleFn, decltype(&::cudaIpcGetMemHandle)>);
static_assert(std::is_same_v<CudaIpcOpenMemHandleFn, decltype(&::cudaIpcOpenMemHandle)>);
static_assert(std::is_same_v<CudaDeviceCanAccessPeerFn, decltype(&::cudaDeviceCanAccessPeer)>);
static_assert(std::is_same_v<CudaDeviceEnablePeerAccessFn, decltype(&::cudaDeviceEnablePeerAccess)>);
static_assert(std::is_same_v<CudaDeviceGetPCIBusIdFn, decltype(&::cudaDeviceGetPCIBusId)>);
static_assert(std::is_same_v<CudaDeviceGetByPCIBusIdFn, decltype(&::cudaDeviceGetByPCIBusId)>);
static_assert(std::is_same_v<CudaVoidFn, decltype(&::cudaGetLastError)>);
static_assert(std::is_same_v<CudaVoidFn, decltype(&::cudaDeviceSynchronize)>);
static_assert(std::is_same_v<CudaDeviceGetAttributeFn, decltype(&::cudaDeviceGetAttribute)>);
static_assert(std::is_same_v<CuModuleLoadDataFn, decltype(&::cuModuleLoadData)>);
static_assert(std::is_same_v<CuModuleGetFunctionFn, decltype(&::cuModuleGetFunction)>);
static_assert(std::is_same_v<CuModuleUnloadFn, decltype(&::cuModuleUnload)>);
static_assert(std::is_same_v<CuLaunchKernelFn, decltype(&::cuLaunchKernel)>);
static_assert(std::is_same_v<CuGetErrorStringFn, decltype(&::cuGetErrorString)>);
static_assert(std::is_same_v<CuCtxGetCurrentFn, decltype(&::cuCtxGetCurrent)>);
static_assert(std::is_same_v<CuCtxSetCurrentFn, decltype(&::cuCtxSetCurrent)>);
static_assert(std::is_same_v<CuLaunchKernelExFn, decltype(&::cuLaunchKernelEx)>);
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
  // (the one-shot all-reduce)
  api::CudaMallocFn Malloc = nullptr;
  api::CudaPtrFn Free = nullptr;
  api::CudaMemsetFn Memset = nullptr;
  api::CudaMemcpyFn Memcpy = nullptr;
  api::CudaHostAllocFn HostAlloc = nullptr;
  api::CudaHostGetDevicePointerFn HostGetDevicePointer = nullptr;
  api::CudaPtrFn FreeHost = nullptr;
  api::CudaIpcGetMemHandleFn IpcGetMemHandle = nullptr;
  api::CudaIpcOpenMemHandleFn IpcOpenMemHandle = nullptr;
  api::CudaPtrFn IpcCloseMemHandle = nullptr;
  api::CudaDeviceCanAccessPeerFn DeviceCanAccessPeer = nullptr;
  api::CudaDeviceEnablePeerAccessFn DeviceEnablePeerAccess = nullptr;
  api::CudaDeviceGetPCIBusIdFn DeviceGetPCIBusId = nullptr;
  api::CudaDeviceGetByPCIBusIdFn DeviceGetByPCIBusId = nullptr;
  api::CudaVoidFn GetLastCudaError = nullptr;
  api::CudaVoidFn DeviceSynchronize = nullptr;
  api::CudaDeviceGetAttributeFn DeviceGetAttribute = nullptr;
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
  Bind(libs->cudart, "cudaMalloc", &libs->Malloc, cudart_name);
  Bind(libs->cudart, "cudaFree", &libs->Free, cudart_name);
  Bind(libs->cudart, "cudaMemset", &libs->Memset, cudart_name);
  Bind(libs->cudart, "cudaMemcpy", &libs->Memcpy, cudart_name);
  Bind(libs->cudart, "cudaHostAlloc", &libs->HostAlloc, cudart_name);
  Bind(libs->cudart, "cudaHostGetDevicePointer", &libs->HostGetDevicePointer, cudart_name);
  Bind(libs->cudart, "cudaFreeHost", &libs->FreeHost, cudart_name);
  Bind(libs->cudart, "cudaIpcGetMemHandle", &libs->IpcGetMemHandle, cudart_name);
  Bind(libs->cudart, "cudaIpcOpenMemHandle", &libs->IpcOpenMemHandle, cudart_name);
  Bind(libs->cudart, "cudaIpcCloseMemHandle", &libs->IpcCloseMemHandle, cudart_name);
  Bind(libs->cudart, "cudaDeviceCanAccessPeer", &libs->DeviceCanAccessPeer, cudart_name);
  Bind(libs->cudart, "cudaDeviceEnablePeerAccess", &libs->DeviceEnablePeerAccess, cudart_name);
  Bind(libs->cudart, "cudaDeviceGetPCIBusId", &libs->DeviceGetPCIBusId, cudart_name);
  Bind(libs->cudart, "cudaDeviceGetByPCIBusId", &libs->DeviceGetByPCIBusId, cudart_name);
  Bind(libs->cudart, "cudaGetLastError", &libs->GetLastCudaError, cudart_name);
  Bind(libs->cudart, "cudaDeviceSynchronize", &libs->DeviceSynchronize, cudart_name);
  Bind(libs->cudart, "cudaDeviceGetAttribute", &libs->DeviceGetAttribute, cudart_name);
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
// One-shot all-reduce: the kernel (CUDA C++, compiled at init), its launch plan, the driver
// ------------------------------------------------------------------------------------------

constexpr int kOneShotMaxRanks = 8;      // MLC_OS_MAX_RANKS
constexpr int kOneShotThreads = 512;     // MLC_OS_THREADS
constexpr int kOneShotBlockCap = 64;     // most blocks of one call (well under one per SM)
constexpr uint64_t kOneShotHeaderBytes = 256;
constexpr int kOneShotLayoutVersion = 1;
constexpr int64_t kOneShotDefaultMaxBytes = 256 << 10;
constexpr double kOneShotDefaultTimeoutS = 30.0;
// kernel index: 0 float16, 1 bfloat16, 2 float32 (the template argument DT of the source)
const char* const kOneShotKernels[3] = {"mlc_oneshot_allreduce_f16", "mlc_oneshot_allreduce_bf16",
                                        "mlc_oneshot_allreduce_f32"};

/*!
 * \brief The kernel, compiled at init by the controller through `tvm_callback_cuda_compile`
 * (returned by `runtime.disco.mlc_nccl.oneshot_source`; tests compile it with nvcc).  Its
 * symbols carry the prefix mlc_oneshot_ and live in a module of their own (cuModuleLoadData),
 * so they cannot clash with TVM's kernels; a compile callback that caches by the source's
 * hash (the course's does) stores it under a name no TVM library shares.
 */
const char kOneShotSource[] = R"MLC_CUDA(
// mlc_course one-shot all-reduce (runtime.disco.mlc_nccl), layout version 1.
// Compiled at init through tvm_callback_cuda_compile and loaded with the CUDA driver API; no
// #include, so it compiles the same under nvcc and NVRTC, and every operation whose rounding
// or ordering matters is written in PTX (fast-math flags cannot turn the adds into flushing
// ones, nor the loads into cached ones).
//
// Each rank r owns one buffer that the other ranks can write (CUDA IPC or peer access):
//   [0, 256)           abort word (u32): 1 + the rank that gave up waiting, 0 while healthy
//   flags              u64 flags[8][max_blocks]: flags[src][b] = last epoch whose block b of
//                      rank src has written its data into this buffer
//   data               2 (epoch parity) x nranks (source rank) x slot_bytes
// A call with epoch e: block b copies its chunks of `send` into slot [e & 1][r] of every
// rank (its own included), fences at system scope, raises flags[r][b] = e in every other
// rank's buffer, waits until flags[q][b] >= e here for every q, then sums slot [e & 1][q]
// over q = 0..nranks-1 in float32, in that order, and writes its chunks of `recv`.
// The epoch of block b lives in device memory (epochs[b]) and is advanced by the kernel, so a
// CUDA-graph replay (same launch arguments) moves on by itself. Chunk c (16 bytes) always
// belongs to block (c / kThreads) % max_blocks, whatever the message size, so a block only
// ever reuses slot regions that it, and the same block of every peer, last used two of its
// epochs ago; a peer can be at most one epoch ahead (it waits for this rank's flag).

#define MLC_OS_MAX_RANKS 8
#define MLC_OS_THREADS 512

typedef unsigned long long mlc_u64;
typedef unsigned int mlc_u32;
typedef unsigned short mlc_u16;

struct MlcOneshotArgs {
  const void* send;
  void* recv;
  mlc_u64 nbytes;                         // message bytes
  mlc_u64 slot_bytes;                     // bytes per (parity, source) slot, multiple of 16
  char* data[MLC_OS_MAX_RANKS];           // data region of rank q's buffer, as mapped here
  mlc_u64* flags[MLC_OS_MAX_RANKS];       // flag array of rank q's buffer
  mlc_u32* abort_word[MLC_OS_MAX_RANKS];  // abort word of rank q's buffer
  mlc_u64* epochs;                        // this rank's per-block epochs (local memory)
  mlc_u32* host_error;                    // mapped host words: status, peer, block, epoch
  mlc_u64 timeout_ns;
  int rank;
  int nranks;
  int max_blocks;
  int send_aligned;                       // send is 16-byte aligned
  int recv_aligned;                       // recv is 16-byte aligned
  int reserved;
};
static_assert(sizeof(MlcOneshotArgs) == 272, "MlcOneshotArgs layout (nccl.cc mirrors it)");
static_assert(__builtin_offsetof(MlcOneshotArgs, data) == 32, "layout");
static_assert(__builtin_offsetof(MlcOneshotArgs, flags) == 96, "layout");
static_assert(__builtin_offsetof(MlcOneshotArgs, abort_word) == 160, "layout");
static_assert(__builtin_offsetof(MlcOneshotArgs, epochs) == 224, "layout");
static_assert(__builtin_offsetof(MlcOneshotArgs, timeout_ns) == 240, "layout");
static_assert(__builtin_offsetof(MlcOneshotArgs, rank) == 248, "layout");
static_assert(__builtin_offsetof(MlcOneshotArgs, recv_aligned) == 264, "layout");

struct __align__(16) MlcChunk {
  mlc_u32 w[4];
};

// ---- memory operations (PTX: the ordering and cache behaviour are the point) ----
__device__ __forceinline__ mlc_u64 mlc_ld_acquire_sys(const mlc_u64* p) {
  mlc_u64 v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void mlc_st_release_sys(mlc_u64* p, mlc_u64 v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ mlc_u32 mlc_ld_volatile(const mlc_u32* p) {
  mlc_u32 v;
  asm volatile("ld.volatile.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void mlc_st_volatile(mlc_u32* p, mlc_u32 v) {
  asm volatile("st.volatile.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ mlc_u64 mlc_ld_cg_u64(const mlc_u64* p) {
  mlc_u64 v;
  asm volatile("ld.global.cg.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void mlc_fence_sys() { asm volatile("fence.acq_rel.sys;" ::: "memory"); }
__device__ __forceinline__ mlc_u64 mlc_globaltimer() {
  mlc_u64 t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
// 16-byte load that bypasses L1 (peers write these slots over NVLink)
__device__ __forceinline__ MlcChunk mlc_ld_cg_chunk(const void* p) {
  MlcChunk v;
  asm volatile("ld.global.cg.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.w[0]), "=r"(v.w[1]), "=r"(v.w[2]), "=r"(v.w[3])
               : "l"(p)
               : "memory");
  return v;
}
__device__ __forceinline__ MlcChunk mlc_ld_chunk(const void* p) {
  MlcChunk v;
  asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.w[0]), "=r"(v.w[1]), "=r"(v.w[2]), "=r"(v.w[3])
               : "l"(p)
               : "memory");
  return v;
}
// scalar loads of the send buffer (its unaligned or ragged tail), also in PTX: a plain C++ load
// could become ld.global.nc, which ptxas may hoist above griddepcontrol.wait (see mlc_pdl_wait)
__device__ __forceinline__ mlc_u32 mlc_ld_u32(const void* p) {
  mlc_u32 v;
  asm volatile("ld.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ mlc_u32 mlc_ld_u16(const void* p) {
  mlc_u16 v;
  asm volatile("ld.global.u16 %0, [%1];" : "=h"(v) : "l"(p) : "memory");
  return (mlc_u32)v;
}
__device__ __forceinline__ void mlc_st_chunk(void* p, const MlcChunk& v) {
  asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.w[0]), "r"(v.w[1]),
               "r"(v.w[2]), "r"(v.w[3])
               : "memory");
}

// ---- programmatic dependent launch (sm_90+) ----
// With MLC_NCCL_ONESHOT_PDL=1 the host launches this kernel with programmaticStreamSerializationAllowed
// on sm_90+, like every other kernel of the decode step: it may then start while
// the kernel before it (the GEMV that writes `send`) is still running, and the kernel after it
// may start once every block of this one has passed mlc_pdl_launch_dependents.  So:
//   - launch_dependents comes first: the next kernel only gets its blocks resident and then
//     waits in its own griddepcontrol.wait until this grid has completed and flushed (that
//     wait covers the whole grid, not the trigger), so triggering early is always safe;
//   - wait comes before *any* global memory access: `send` is written by the previous kernel,
//     and the epochs, flags, slots and abort words by earlier one-shot kernels (also earlier in
//     this stream).  Every global load here is asm volatile with a "memory" clobber and none is
//     ld.global.nc, so neither the compiler nor ptxas can move one above the wait.
// Without the launch attribute (the default, older GPUs) both are no-ops.
__device__ __forceinline__ void mlc_pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void mlc_pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// ---- numbers: exact conversions, round-to-nearest-even, no flush to zero ----
__device__ __forceinline__ float mlc_f16_to_f32(mlc_u32 h) {
  float f;
  mlc_u16 s = (mlc_u16)h;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(s));
  return f;
}
__device__ __forceinline__ mlc_u32 mlc_f32_to_f16(float f) {
  mlc_u16 s;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(s) : "f"(f));
  return (mlc_u32)s;
}
__device__ __forceinline__ float mlc_bf16_to_f32(mlc_u32 h) {
  float f;
  asm("mov.b32 %0, %1;" : "=f"(f) : "r"((h & 0xffffu) << 16));
  return f;
}
__device__ __forceinline__ mlc_u32 mlc_f32_to_bf16(float f) {
  mlc_u16 s;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(s) : "f"(f));
  return (mlc_u32)s;
}
__device__ __forceinline__ float mlc_bits_to_f32(mlc_u32 u) {
  float f;
  asm("mov.b32 %0, %1;" : "=f"(f) : "r"(u));
  return f;
}
__device__ __forceinline__ mlc_u32 mlc_f32_to_bits(float f) {
  mlc_u32 u;
  asm("mov.b32 %0, %1;" : "=r"(u) : "f"(f));
  return u;
}
__device__ __forceinline__ float mlc_add(float a, float b) {
  float c;
  asm("add.rn.f32 %0, %1, %2;" : "=f"(c) : "f"(a), "f"(b));
  return c;
}

// DT: 0 float16, 1 bfloat16, 2 float32
template <int DT>
struct MlcType {
  static constexpr int kBytes = DT == 2 ? 4 : 2;
  static constexpr int kPerChunk = 16 / kBytes;
  // element k of a chunk, as float
  static __device__ __forceinline__ float get(const MlcChunk& c, int k) {
    if (DT == 2) return mlc_bits_to_f32(c.w[k]);
    mlc_u32 h = (c.w[k >> 1] >> ((k & 1) * 16)) & 0xffffu;
    return DT == 0 ? mlc_f16_to_f32(h) : mlc_bf16_to_f32(h);
  }
  static __device__ __forceinline__ mlc_u32 put(float f) {
    return DT == 2 ? mlc_f32_to_bits(f) : (DT == 0 ? mlc_f32_to_f16(f) : mlc_f32_to_bf16(f));
  }
};

// Chunk c of a tensor of `nbytes` bytes: one 16-byte access when aligned and whole, else
// element by element (tensors are aligned to their element size); bytes past the end read 0.
template <int DT>
__device__ __forceinline__ MlcChunk mlc_load_input(const void* base, mlc_u64 c, mlc_u64 nbytes,
                                                   int aligned) {
  const char* p = static_cast<const char*>(base) + c * 16;
  if (aligned && (c + 1) * 16 <= nbytes) return mlc_ld_chunk(p);
  MlcChunk v;
  v.w[0] = v.w[1] = v.w[2] = v.w[3] = 0u;
  for (int k = 0; k < MlcType<DT>::kPerChunk; ++k) {
    if (c * 16 + (mlc_u64)(k + 1) * MlcType<DT>::kBytes > nbytes) break;
    if (MlcType<DT>::kBytes == 4) {
      v.w[k] = mlc_ld_u32(p + 4 * k);
    } else {
      v.w[k >> 1] |= mlc_ld_u16(p + 2 * k) << ((k & 1) * 16);
    }
  }
  return v;
}

template <int DT>
__device__ __forceinline__ void mlc_store_output(void* base, mlc_u64 c, mlc_u64 nbytes,
                                                 int aligned, const MlcChunk& v) {
  char* p = static_cast<char*>(base) + c * 16;
  if (aligned && (c + 1) * 16 <= nbytes) {
    mlc_st_chunk(p, v);
    return;
  }
  for (int k = 0; k < MlcType<DT>::kPerChunk; ++k) {
    if (c * 16 + (mlc_u64)(k + 1) * MlcType<DT>::kBytes > nbytes) break;
    if (MlcType<DT>::kBytes == 4) {
      *reinterpret_cast<mlc_u32*>(p + 4 * k) = v.w[k];
    } else {
      *reinterpret_cast<mlc_u16*>(p + 2 * k) = (mlc_u16)(v.w[k >> 1] >> ((k & 1) * 16));
    }
  }
}

// Status codes in host_error[0] (and what the host reports): 1 timed out waiting for a peer,
// 2 stopped because another rank had timed out (abort word set).
__device__ void mlc_note_error(const MlcOneshotArgs& a, mlc_u32 code, mlc_u32 peer, mlc_u32 block,
                               mlc_u64 epoch) {
  mlc_u32* h = a.host_error;
  if (mlc_ld_volatile(h) == 0u) {
    mlc_st_volatile(h + 1, peer);
    mlc_st_volatile(h + 2, block);
    mlc_st_volatile(h + 3, (mlc_u32)epoch);
    mlc_fence_sys();
    mlc_st_volatile(h, code);
  }
  if (code == 1u) {  // tell every rank, so that none waits out its own timeout
    for (int q = 0; q < a.nranks; ++q) mlc_st_volatile(a.abort_word[q], (mlc_u32)a.rank + 1u);
    mlc_fence_sys();
  }
}

template <int DT>
__device__ __forceinline__ void mlc_oneshot_body(const MlcOneshotArgs& a) {
  typedef MlcType<DT> T;
  const int tid = threadIdx.x;
  const int b = blockIdx.x;
  const int n = a.nranks;
  const int r = a.rank;
  __shared__ mlc_u64 s_epoch;
  __shared__ mlc_u32 s_abort;
  mlc_pdl_launch_dependents();
  mlc_pdl_wait();  // nothing global is read or written above this line
  if (tid == 0) {
    const mlc_u64 e = mlc_ld_cg_u64(a.epochs + b) + 1ull;  // only this block of this rank
    a.epochs[b] = e;                                       // writes it; kernels are ordered
    s_epoch = e;
  } else if (tid == 32) {
    s_abort = mlc_ld_volatile(a.abort_word[r]);
  }
  __syncthreads();
  const mlc_u64 e = s_epoch;
  if (s_abort != 0u) {  // an earlier call timed out somewhere: the path is dead, skip at once
    if (tid == 0) mlc_note_error(a, 2u, s_abort - 1u, (mlc_u32)b, e);
    return;
  }
  const mlc_u64 parity = e & 1ull;
  const mlc_u64 nchunks = (a.nbytes + 15ull) >> 4;
  const mlc_u64 stride = (mlc_u64)gridDim.x * MLC_OS_THREADS;
  const mlc_u64 first = (mlc_u64)b * MLC_OS_THREADS + (mlc_u64)tid;

  // 1. push this rank's chunks into slot [parity][r] of every rank
  const mlc_u64 out_off = (parity * (mlc_u64)n + (mlc_u64)r) * a.slot_bytes;
  for (mlc_u64 c = first; c < nchunks; c += stride) {
    const MlcChunk v = mlc_load_input<DT>(a.send, c, a.nbytes, a.send_aligned);
#pragma unroll
    for (int k = 0; k < MLC_OS_MAX_RANKS; ++k) {
      if (k < n) {
        int q = r + k;  // start with the next rank: the ranks spread their NVLink traffic
        if (q >= n) q -= n;
        mlc_st_chunk(a.data[q] + out_off + c * 16, v);
      }
    }
  }
  if (first < nchunks) mlc_fence_sys();  // data visible system-wide before any flag
  __syncthreads();

  // 2. raise this block's flag in every other rank; wait for theirs here
  mlc_u32 fail = 0u;
  if (tid < n && tid != r) {
    mlc_st_release_sys(a.flags[tid] + (mlc_u64)r * a.max_blocks + b, e);
    const mlc_u64* f = a.flags[r] + (mlc_u64)tid * a.max_blocks + b;
    if (mlc_ld_acquire_sys(f) < e) {  // >=: a fast peer may already be one epoch ahead
      const mlc_u64 t0 = mlc_globaltimer();
      mlc_u32 spins = 0u;
      while (mlc_ld_acquire_sys(f) < e) {
        if ((++spins & 255u) == 0u) {
          const mlc_u32 ab = mlc_ld_volatile(a.abort_word[r]);
          if (ab != 0u) {
            fail = 1u;
            mlc_note_error(a, 2u, ab - 1u, (mlc_u32)b, e);
            break;
          }
          if (mlc_globaltimer() - t0 > a.timeout_ns) {
            fail = 1u;
            mlc_note_error(a, 1u, (mlc_u32)tid, (mlc_u32)b, e);
            break;
          }
        }
      }
    }
  }
  if (__syncthreads_or(fail)) return;

  // 3. sum the slots in rank order, in float32, and write this block's chunks of recv
  const char* in = a.data[r] + parity * (mlc_u64)n * a.slot_bytes;
  for (mlc_u64 c = first; c < nchunks; c += stride) {
    MlcChunk v[MLC_OS_MAX_RANKS];
#pragma unroll
    for (int q = 0; q < MLC_OS_MAX_RANKS; ++q) {
      if (q < n) v[q] = mlc_ld_cg_chunk(in + (mlc_u64)q * a.slot_bytes + c * 16);
    }
    MlcChunk out;
#pragma unroll
    for (int w = 0; w < 4; ++w) out.w[w] = 0u;
#pragma unroll
    for (int k = 0; k < T::kPerChunk; ++k) {
      float acc = T::get(v[0], k);  // not 0 + x0: keeps -0.0 as NCCL does
#pragma unroll
      for (int q = 1; q < MLC_OS_MAX_RANKS; ++q) {
        if (q < n) acc = mlc_add(acc, T::get(v[q], k));
      }
      if (T::kBytes == 4) {
        out.w[k] = T::put(acc);
      } else {
        out.w[k >> 1] |= T::put(acc) << ((k & 1) * 16);
      }
    }
    mlc_store_output<DT>(a.recv, c, a.nbytes, a.recv_aligned, out);
  }
}

extern "C" __global__ void __launch_bounds__(MLC_OS_THREADS)
    mlc_oneshot_allreduce_f16(const MlcOneshotArgs a) {
  mlc_oneshot_body<0>(a);
}
extern "C" __global__ void __launch_bounds__(MLC_OS_THREADS)
    mlc_oneshot_allreduce_bf16(const MlcOneshotArgs a) {
  mlc_oneshot_body<1>(a);
}
extern "C" __global__ void __launch_bounds__(MLC_OS_THREADS)
    mlc_oneshot_allreduce_f32(const MlcOneshotArgs a) {
  mlc_oneshot_body<2>(a);
}
)MLC_CUDA";

/*! \brief Host mirror of MlcOneshotArgs in kOneShotSource (both sides assert the layout). */
struct OneShotArgs {
  const void* send;
  void* recv;
  uint64_t nbytes;
  uint64_t slot_bytes;
  char* data[kOneShotMaxRanks];
  uint64_t* flags[kOneShotMaxRanks];
  uint32_t* abort_word[kOneShotMaxRanks];
  uint64_t* epochs;
  uint32_t* host_error;
  uint64_t timeout_ns;
  int32_t rank;
  int32_t nranks;
  int32_t max_blocks;
  int32_t send_aligned;
  int32_t recv_aligned;
  int32_t reserved;
};
static_assert(sizeof(OneShotArgs) == 272, "MlcOneshotArgs layout");
static_assert(offsetof(OneShotArgs, data) == 32 && offsetof(OneShotArgs, flags) == 96 &&
                  offsetof(OneShotArgs, abort_word) == 160 && offsetof(OneShotArgs, epochs) == 224 &&
                  offsetof(OneShotArgs, timeout_ns) == 240 && offsetof(OneShotArgs, rank) == 248 &&
                  offsetof(OneShotArgs, recv_aligned) == 264,
              "MlcOneshotArgs layout");

/*! \brief Where things are in each rank's buffer (the same on every rank). */
struct OneShotLayout {
  int max_blocks = 0;          // blocks of the largest call; chunk c belongs to block
                               // (c / kOneShotThreads) % max_blocks
  uint64_t slot_bytes = 0;     // capacity rounded up to 16 bytes
  uint64_t flags_offset = 0;   // u64 flags[kOneShotMaxRanks][max_blocks]
  uint64_t data_offset = 0;    // 2 x nranks x slot_bytes
  uint64_t total_bytes = 0;
};

OneShotLayout PlanOneShotLayout(int nranks, int64_t capacity) {
  OneShotLayout l;
  uint64_t cap = static_cast<uint64_t>(std::max<int64_t>(capacity, 16));
  l.slot_bytes = (cap + 15) / 16 * 16;
  uint64_t chunks = l.slot_bytes / 16;
  uint64_t blocks = (chunks + kOneShotThreads - 1) / kOneShotThreads;
  l.max_blocks = static_cast<int>(std::min<uint64_t>(std::max<uint64_t>(blocks, 1), kOneShotBlockCap));
  l.flags_offset = kOneShotHeaderBytes;
  uint64_t flags_bytes = static_cast<uint64_t>(kOneShotMaxRanks) * l.max_blocks * sizeof(uint64_t);
  l.data_offset = (l.flags_offset + flags_bytes + 255) / 256 * 256;
  l.total_bytes = l.data_offset + 2ull * static_cast<uint64_t>(nranks) * l.slot_bytes;
  return l;
}

/*! \brief Blocks of one call: a function of the size only, so every rank launches the same grid. */
unsigned OneShotBlocks(uint64_t nbytes, int max_blocks) {
  uint64_t chunks = (nbytes + 15) / 16;
  uint64_t blocks = (chunks + kOneShotThreads - 1) / kOneShotThreads;
  return static_cast<unsigned>(std::min<uint64_t>(std::max<uint64_t>(blocks, 1), max_blocks));
}

/*!
 * \brief "" when an all-reduce (kind, dtype, bytes) may take the one-shot path, else why not;
 * the kernel index goes to *which.  Pure: checked by the CPU tests.
 */
std::string OneShotEligible(int kind, DLDataType t, int64_t nbytes, int64_t max_bytes, int* which) {
  if (kind != static_cast<int>(ReduceKind::kSum)) return "op is not sum";
  int k = -1;
  if (t.lanes == 1 && t.code == kDLFloat && t.bits == 16) k = 0;
  if (t.lanes == 1 && t.code == kDLBfloat && t.bits == 16) k = 1;
  if (t.lanes == 1 && t.code == kDLFloat && t.bits == 32) k = 2;
  if (k < 0) return "dtype is not float16, bfloat16 or float32";
  if (nbytes <= 0) return "empty";
  if (nbytes > max_bytes) {
    return std::to_string(nbytes) + " bytes > max_bytes " + std::to_string(max_bytes);
  }
  if (which != nullptr) *which = k;
  return "";
}

std::string JsonEscape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\u%04x", static_cast<unsigned>(c));
      out += buf;
    } else {
      out += c;
    }
  }
  return out;
}

/*! \brief The CUDA driver API (libcuda.so.1), for the one-shot kernel only. */
struct Driver {
  void* lib = nullptr;
  std::string path;
  api::CuModuleLoadDataFn ModuleLoadData = nullptr;
  api::CuModuleGetFunctionFn ModuleGetFunction = nullptr;
  api::CuModuleUnloadFn ModuleUnload = nullptr;
  api::CuLaunchKernelFn LaunchKernel = nullptr;
  api::CuGetErrorStringFn GetErrorString = nullptr;
  api::CuCtxGetCurrentFn CtxGetCurrent = nullptr;
  api::CuCtxSetCurrentFn CtxSetCurrent = nullptr;
  // optional (nullptr when this libcuda lacks them): programmatic dependent launch
  api::CuLaunchKernelExFn LaunchKernelEx = nullptr;
  api::CuFuncGetAttributeFn FuncGetAttribute = nullptr;
};

std::mutex g_driver_mutex;
Driver* g_driver = nullptr;  // set once, never freed

Driver* GetDriver() {
  std::lock_guard<std::mutex> lock(g_driver_mutex);
  if (g_driver != nullptr) return g_driver;
  auto d = std::make_unique<Driver>();
  std::string opened, why;
  d->lib = OpenFirst({"libcuda.so.1", "libcuda.so"}, &opened, &why);
  if (d->lib == nullptr) CCL_ERROR << "cannot open the CUDA driver (libcuda.so.1). Tried:" << why;
  const std::string name = "libcuda";
  Bind(d->lib, "cuModuleLoadData", &d->ModuleLoadData, name);
  Bind(d->lib, "cuModuleGetFunction", &d->ModuleGetFunction, name);
  Bind(d->lib, "cuModuleUnload", &d->ModuleUnload, name);
  Bind(d->lib, "cuLaunchKernel", &d->LaunchKernel, name);
  Bind(d->lib, "cuGetErrorString", &d->GetErrorString, name);
  Bind(d->lib, "cuCtxGetCurrent", &d->CtxGetCurrent, name);
  Bind(d->lib, "cuCtxSetCurrent", &d->CtxSetCurrent, name);
  dlerror();
  d->LaunchKernelEx = reinterpret_cast<api::CuLaunchKernelExFn>(dlsym(d->lib, "cuLaunchKernelEx"));
  d->FuncGetAttribute =
      reinterpret_cast<api::CuFuncGetAttributeFn>(dlsym(d->lib, "cuFuncGetAttribute"));
  dlerror();
  d->path = PathOf(reinterpret_cast<void*>(d->ModuleLoadData), opened);
  g_driver = d.release();
  return g_driver;
}

std::string CuErrorText(api::CuResult r) {
  const char* s = nullptr;
  if (g_driver != nullptr && g_driver->GetErrorString != nullptr) g_driver->GetErrorString(r, &s);
  return "CUDA driver error " + std::to_string(static_cast<int>(r)) + (s ? std::string(" (") + s + ")" : "");
}

/*!
 * \brief Per-worker state of the one-shot path.  `active` is the same on every rank (decided
 * together at init); `enabled` is the run-time switch (debug_set_allreduce_path), which the
 * caller must flip on every worker between the same two collectives.
 */
struct OneShot {
  bool active = false;
  bool enabled = false;
  std::string reason;          // why it is active, or why not
  std::string kernel_note;     // how the kernel was built
  int64_t capacity = 0;        // bytes per slot (the largest message it can take)
  int64_t max_bytes = 0;       // the current threshold (<= capacity)
  double timeout_s = 0;
  OneShotLayout layout;
  api::CuContext cu_ctx = nullptr;
  api::CuModule module = nullptr;
  api::CuFunction fn[3] = {nullptr, nullptr, nullptr};
  char* buffer = nullptr;           // this rank's buffer (cudaMalloc)
  uint64_t* epochs = nullptr;       // per-block epochs (cudaMalloc)
  uint32_t* host_error = nullptr;   // mapped host memory [status, peer, block, epoch]
  uint32_t* host_error_dev = nullptr;
  char* peer_base[kOneShotMaxRanks] = {};
  bool ipc_opened[kOneShotMaxRanks] = {};
  std::vector<std::string> peer_kind;  // "self", "cuda ipc", "peer access"
  OneShotArgs args{};                  // everything but send/recv/nbytes/alignment
  uint64_t oneshot_calls = 0, nccl_calls = 0;  // host-side dispatches (not graph replays)
  // programmatic dependent launch (cuLaunchKernelEx with programmaticStreamSerializationAllowed)
  bool pdl_requested = true;   // the controller's setting (MLC_NCCL_ONESHOT_PDL)
  bool pdl_supported = false;  // sm_90+, cuLaunchKernelEx present, kernel built for sm_90+
  bool pdl = false;            // what launches use now (debug_set_oneshot_pdl flips it)
  std::string pdl_note;        // why (not)
};

/*! \brief Frees what SetupOneShot made (best effort, never throws: runs at thread exit too). */
void ReleaseOneShot(OneShot* os) {
  Libs* l = g_libs;
  os->active = os->enabled = false;
  os->pdl = os->pdl_supported = false;
  if (l == nullptr) return;
  bool any = os->buffer || os->epochs || os->host_error || os->module;
  for (int q = 0; q < kOneShotMaxRanks; ++q) any = any || os->ipc_opened[q];
  if (!any) return;
  l->DeviceSynchronize();  // no kernel of ours still running (its wait is bounded)
  for (int q = 0; q < kOneShotMaxRanks; ++q) {
    if (os->ipc_opened[q] && os->peer_base[q] != nullptr) l->IpcCloseMemHandle(os->peer_base[q]);
    os->ipc_opened[q] = false;
    os->peer_base[q] = nullptr;
  }
  if (os->buffer != nullptr) l->Free(os->buffer);
  if (os->epochs != nullptr) l->Free(os->epochs);
  if (os->host_error != nullptr) l->FreeHost(os->host_error);
  if (os->module != nullptr && g_driver != nullptr) g_driver->ModuleUnload(os->module);
  os->buffer = nullptr;
  os->epochs = nullptr;
  os->host_error = os->host_error_dev = nullptr;
  os->module = nullptr;
  os->fn[0] = os->fn[1] = os->fn[2] = nullptr;
  l->GetLastCudaError();  // leave no error of ours behind for TVM to trip over
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
  OneShot oneshot;                 // the one-shot all-reduce (inactive unless set up)

  ~Context() { Release(); }

  void Release() {
    Libs* l = g_libs;
    if (l == nullptr) return;
    // Best effort: never throw from here (it runs at thread exit).
    int prev = -1;
    l->GetDevice(&prev);
    l->SetDevice(device_id);
    ReleaseOneShot(&oneshot);
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
// set by `configure_oneshot` (controller); negative: take the environment variable
int g_oneshot_mode = -1;
int64_t g_oneshot_max_bytes = -1;
double g_oneshot_timeout_s = -1;
int g_oneshot_pdl = -1;  // set by `configure_oneshot_pdl`: 1 on, 0 off, -1 MLC_NCCL_ONESHOT_PDL

/*! \brief What the controller tells every worker about the one-shot path. */
struct OneShotConfig {
  bool enabled = true;
  int64_t max_bytes = kOneShotDefaultMaxBytes;
  double timeout_s = kOneShotDefaultTimeoutS;
  bool pdl = true;  // launch with programmatic dependent launch where the GPU can
  std::string why_off;
};

/*! \brief configure_oneshot's values, else MLC_NCCL_ONESHOT{,_MAX_BYTES,_TIMEOUT_S}, else defaults. */
OneShotConfig ResolveOneShotConfig() {
  int mode;
  int64_t max_bytes;
  double timeout_s;
  int pdl;
  {
    std::lock_guard<std::mutex> lock(g_config_mutex);
    pdl = g_oneshot_pdl;
    mode = g_oneshot_mode;
    max_bytes = g_oneshot_max_bytes;
    timeout_s = g_oneshot_timeout_s;
  }
  OneShotConfig c;
  std::string from = "configure_oneshot";
  if (mode < 0) {
    const char* v = std::getenv("MLC_NCCL_ONESHOT");
    std::string s = v ? v : "";
    std::transform(s.begin(), s.end(), s.begin(), [](unsigned char ch) { return std::tolower(ch); });
    mode = (s == "0" || s == "off" || s == "false" || s == "no") ? 0 : 1;
    from = "MLC_NCCL_ONESHOT=" + std::string(v ? v : "");
  }
  if (max_bytes < 0) {
    const char* v = std::getenv("MLC_NCCL_ONESHOT_MAX_BYTES");
    max_bytes = (v && *v) ? std::strtoll(v, nullptr, 10) : kOneShotDefaultMaxBytes;
  }
  if (timeout_s <= 0) {
    const char* v = std::getenv("MLC_NCCL_ONESHOT_TIMEOUT_S");
    timeout_s = (v && *v) ? std::strtod(v, nullptr) : kOneShotDefaultTimeoutS;
    if (!(timeout_s > 0)) timeout_s = kOneShotDefaultTimeoutS;
  }
  if (pdl < 0) {
    const char* v = std::getenv("MLC_NCCL_ONESHOT_PDL");
    std::string s = v ? v : "";
    std::transform(s.begin(), s.end(), s.begin(), [](unsigned char ch) { return std::tolower(ch); });
    // default off: measured slower in decode (2x H200, Llama-2-70B TP=2: 111.0 tok/s with,
    // 116.0 without; data/results/gpu_h200x2_oneshot_pdl.json), though 0.2 us faster per call
    // in a graph of back-to-back all-reduces
    pdl = (s == "1" || s == "on" || s == "true" || s == "yes") ? 1 : 0;
  }
  c.pdl = pdl != 0;
  c.enabled = mode != 0 && max_bytes > 0;
  c.max_bytes = std::max<int64_t>(max_bytes, 0);
  c.timeout_s = timeout_s;
  if (mode == 0) c.why_off = "switched off (" + from + ")";
  else if (max_bytes <= 0) c.why_off = "switched off (max_bytes " + std::to_string(max_bytes) + ")";
  return c;
}

std::mutex g_kernel_mutex;
std::string g_kernel_binary;  // the compiled kernel, once compiled in this process

/*!
 * \brief Controller side: kOneShotSource compiled by `tvm_callback_cuda_compile`, the callback
 * TVM itself calls for the CUDA C++ of its libraries (the course registers an nvcc one on GPU
 * machines; TVM registers its own).  Returns the cubin/fatbin, or "" with *note saying why.
 * Compiled once per process: the controller hands the bytes to every worker, so no worker
 * (a thread of a ThreadedSession, a process of a ProcessSession) compiles anything.
 */
std::string CompileOneShotKernel(std::string* note) {
  std::lock_guard<std::mutex> lock(g_kernel_mutex);
  if (!g_kernel_binary.empty()) {
    *note = "tvm_callback_cuda_compile (" + std::to_string(g_kernel_binary.size()) +
            " bytes, compiled earlier in this process)";
    return g_kernel_binary;
  }
  std::optional<ffi::Function> cb = ffi::Function::GetGlobal("tvm_callback_cuda_compile");
  if (!cb.has_value()) {
    *note = "no kernel: tvm_callback_cuda_compile is not registered in the controller process "
            "(a runtime-only TVM needs one, e.g. mlc_course.gpu.use_nvcc_compiler or "
            "scripts/gpu_run.setup_runtime)";
    return "";
  }
  std::string out;
  try {
    ffi::Any r = (*cb)(ffi::String(kOneShotSource));
    if (auto b = r.try_cast<ffi::Bytes>()) {
      out.assign(b->data(), b->size());
    } else if (auto s = r.try_cast<ffi::String>()) {
      out.assign(s->data(), s->size());
    } else {
      *note = "no kernel: tvm_callback_cuda_compile returned " + r.GetTypeKey() + ", not bytes";
      return "";
    }
  } catch (const std::exception& e) {
    std::string what = e.what();
    if (what.size() > 600) what = what.substr(0, 600) + " ...";
    *note = "no kernel: tvm_callback_cuda_compile failed: " + what;
    return "";
  }
  if (out.empty()) {
    *note = "no kernel: tvm_callback_cuda_compile returned nothing";
    return "";
  }
  g_kernel_binary = out;
  *note = "tvm_callback_cuda_compile (" + std::to_string(out.size()) + " bytes)";
  return out;
}

// ------------------------------------------------------------------------------------------
// One-shot set-up on the workers (collective: every rank makes the same calls)
// ------------------------------------------------------------------------------------------

/*! \brief What each rank tells the others at init (one ncclAllGather of these). */
struct OneShotPeerRecord {
  char ipc[api::kIpcHandleBytes];  // cudaIpcMemHandle_t of the buffer
  uint64_t ptr;                    // the buffer in its owner's address space
  uint64_t slot_bytes;
  int32_t pid;
  int32_t device;                  // CUDA ordinal in its owner's process
  int32_t ok;                      // its local set-up worked
  int32_t version;
  int32_t max_blocks;
  int32_t nranks;
  char pci[32];                    // PCI bus id of its GPU
  char host[160];                  // hostname + boot id
  char why[256];                   // its local failure
};

/*! \brief The second exchange: whether each rank could map every peer's buffer. */
struct OneShotVerdict {
  int32_t ok;
  char why[252];
};

void CopyText(char* dst, size_t cap, const std::string& s) {
  std::memset(dst, 0, cap);
  std::memcpy(dst, s.data(), std::min(s.size(), cap - 1));
}

std::string Text(const char* src, size_t cap) { return std::string(src, strnlen(src, cap)); }

std::string HostId() {
  char name[128] = {0};
  gethostname(name, sizeof(name) - 1);
  std::ifstream f("/proc/sys/kernel/random/boot_id");
  std::string boot;
  std::getline(f, boot);
  return std::string(name) + "/" + boot;
}

#define SETUP_CUDA(what, call)                                                               \
  do {                                                                                       \
    api::CudaError e_ = (call);                                                              \
    if (static_cast<int>(e_) != api::kSuccess) {                                             \
      g_libs->GetLastCudaError();                                                            \
      throw std::runtime_error(std::string(what) + ": CUDA error " +                         \
                               std::to_string(static_cast<int>(e_)) + " (" +                 \
                               g_libs->CudaErrorString(e_) + ")");                           \
    }                                                                                        \
  } while (0)

#define SETUP_CU(what, call)                                                                 \
  do {                                                                                       \
    api::CuResult r_ = (call);                                                               \
    if (static_cast<int>(r_) != api::kSuccess) {                                             \
      throw std::runtime_error(std::string(what) + ": " + CuErrorText(r_));                  \
    }                                                                                        \
  } while (0)

/*! \brief ncclAllGather of one fixed-size host record per rank (staged through the GPU). */
template <typename Record>
std::vector<Record> AllGatherRecords(Context* ctx, const Record& mine) {
  static_assert(std::is_trivially_copyable_v<Record>);
  Libs* l = g_libs;
  const size_t bytes = sizeof(Record);
  const int n = ctx->num_workers;
  char* dev = nullptr;
  CUDA_CHECK("cudaMalloc", l->Malloc(reinterpret_cast<void**>(&dev), bytes * n));
  std::vector<Record> all(n);
  try {
    char* slot = dev + bytes * ctx->worker_id;
    CUDA_CHECK("cudaMemcpy", l->Memcpy(slot, &mine, bytes, static_cast<api::MemcpyKind>(api::kMemcpyHostToDevice)));
    // own_stream is a blocking stream: it runs after the copy above
    NCCL_CHECK("ncclAllGather", ctx->global_comm,
               l->AllGather(slot, dev, bytes, static_cast<api::DataType>(api::kUint8),
                            ctx->global_comm, ctx->own_stream));
    CUDA_CHECK("cudaStreamSynchronize", l->StreamSynchronize(ctx->own_stream));
    CUDA_CHECK("cudaMemcpy", l->Memcpy(all.data(), dev, bytes * n,
                                       static_cast<api::MemcpyKind>(api::kMemcpyDeviceToHost)));
  } catch (...) {
    l->Free(dev);
    throw;
  }
  l->Free(dev);
  return all;
}

/*!
 * \brief Whether the one-shot kernel is launched with programmatic dependent launch: asked for
 * (MLC_NCCL_ONESHOT_PDL=1; default off), a GPU of compute capability 9.0+, cuLaunchKernelEx in
 * libcuda, and kernels compiled for compute_90+ (CU_FUNC_ATTRIBUTE_PTX_VERSION >= 90: only then
 * do they contain griddepcontrol.wait; a PTX-JIT of an older build would not, and must not be
 * launched early).  Local to this rank: it changes when the kernel starts, never what it does,
 * so ranks may differ.
 */
void DecideOneShotPdl(OneShot* os, Driver* d, int major, int minor) {
  os->pdl_supported = false;
  const std::string cc = "sm_" + std::to_string(major) + std::to_string(minor);
  if (major < 9) {
    os->pdl_note = "no: " + cc + " (programmatic dependent launch needs sm_90+)";
  } else if (d->LaunchKernelEx == nullptr) {
    os->pdl_note = "no: libcuda has no cuLaunchKernelEx";
  } else if (d->FuncGetAttribute == nullptr) {
    os->pdl_note = "no: libcuda has no cuFuncGetAttribute";
  } else {
    int lowest = 1 << 30;
    for (int k = 0; k < 3; ++k) {
      int v = 0;
      if (static_cast<int>(d->FuncGetAttribute(&v, api::kFuncAttributePtxVersion, os->fn[k])) !=
          api::kSuccess) {
        v = 0;
      }
      lowest = std::min(lowest, v);
    }
    if (lowest < 90) {
      os->pdl_note = "no: the kernel was compiled for compute_" + std::to_string(lowest) +
                     " (no griddepcontrol before compute_90)";
    } else {
      os->pdl_supported = true;
      os->pdl_note = "cuLaunchKernelEx, programmatic stream serialization (" + cc + ", compute_" +
                     std::to_string(lowest) + ")";
    }
  }
  os->pdl = os->pdl_supported && os->pdl_requested;
  if (os->pdl_supported && !os->pdl_requested) {
    os->pdl_note = "off (the default; MLC_NCCL_ONESHOT_PDL=1 or configure_oneshot_pdl turn it on); would use " +
                   os->pdl_note;
  }
  if (!os->pdl) os->pdl_note += "; plain cuLaunchKernel";
}

/*! \brief This rank's part: load the kernel, allocate buffer, epochs and error word. */
void OneShotLocalSetup(Context* ctx, const std::string& kernel, OneShotPeerRecord* rec) {
  Libs* l = g_libs;
  OneShot& os = ctx->oneshot;
  Driver* d = GetDriver();
  SETUP_CUDA("cudaSetDevice", l->SetDevice(ctx->device_id));
  SETUP_CUDA("cudaFree(0)", l->Free(nullptr));  // the primary context exists and is current
  SETUP_CU("cuCtxGetCurrent", d->CtxGetCurrent(&os.cu_ctx));
  if (os.cu_ctx == nullptr) throw std::runtime_error("no current CUDA context after cudaSetDevice");
  int major = 0, minor = 0;
  l->DeviceGetAttribute(&major, static_cast<api::DeviceAttr>(api::kDevAttrCcMajor), ctx->device_id);
  l->DeviceGetAttribute(&minor, static_cast<api::DeviceAttr>(api::kDevAttrCcMinor), ctx->device_id);
  SETUP_CU("cuModuleLoadData (a kernel built for another GPU?) on sm_" + std::to_string(major) +
               std::to_string(minor),
           d->ModuleLoadData(&os.module, kernel.c_str()));
  for (int k = 0; k < 3; ++k) {
    SETUP_CU(std::string("cuModuleGetFunction ") + kOneShotKernels[k],
             d->ModuleGetFunction(&os.fn[k], os.module, kOneShotKernels[k]));
  }
  DecideOneShotPdl(&os, d, major, minor);
  os.layout = PlanOneShotLayout(ctx->num_workers, os.capacity);
  SETUP_CUDA("cudaMalloc", l->Malloc(reinterpret_cast<void**>(&os.buffer), os.layout.total_bytes));
  SETUP_CUDA("cudaMemset", l->Memset(os.buffer, 0, os.layout.total_bytes));
  size_t epoch_bytes = sizeof(uint64_t) * os.layout.max_blocks;
  SETUP_CUDA("cudaMalloc", l->Malloc(reinterpret_cast<void**>(&os.epochs), epoch_bytes));
  SETUP_CUDA("cudaMemset", l->Memset(os.epochs, 0, epoch_bytes));
  SETUP_CUDA("cudaHostAlloc", l->HostAlloc(reinterpret_cast<void**>(&os.host_error),
                                           4 * sizeof(uint32_t), api::kHostAllocMapped));
  std::memset(os.host_error, 0, 4 * sizeof(uint32_t));
  SETUP_CUDA("cudaHostGetDevicePointer",
             l->HostGetDevicePointer(reinterpret_cast<void**>(&os.host_error_dev), os.host_error, 0));
  SETUP_CUDA("cudaDeviceSynchronize", l->DeviceSynchronize());
  api::IpcMemHandle handle;
  SETUP_CUDA("cudaIpcGetMemHandle", l->IpcGetMemHandle(&handle, os.buffer));
  std::memcpy(rec->ipc, &handle, api::kIpcHandleBytes);
  rec->ptr = reinterpret_cast<uint64_t>(os.buffer);
  rec->slot_bytes = os.layout.slot_bytes;
  rec->max_blocks = os.layout.max_blocks;
  rec->nranks = ctx->num_workers;
  char pci[32] = {0};
  SETUP_CUDA("cudaDeviceGetPCIBusId", l->DeviceGetPCIBusId(pci, sizeof(pci) - 1, ctx->device_id));
  CopyText(rec->pci, sizeof(rec->pci), pci);
  os.kernel_note += ", loaded on sm_" + std::to_string(major) + std::to_string(minor);
}

/*! \brief Map every peer's buffer here: CUDA IPC across processes, peer access within one. */
void OneShotMapPeers(Context* ctx, const std::vector<OneShotPeerRecord>& all) {
  Libs* l = g_libs;
  OneShot& os = ctx->oneshot;
  const OneShotPeerRecord& me = all[ctx->worker_id];
  os.peer_kind.assign(ctx->num_workers, "");
  for (int q = 0; q < ctx->num_workers; ++q) {
    const OneShotPeerRecord& p = all[q];
    if (p.version != me.version || p.slot_bytes != me.slot_bytes ||
        p.max_blocks != me.max_blocks || p.nranks != me.nranks) {
      throw std::runtime_error("worker " + std::to_string(q) + " planned another buffer layout");
    }
    if (q == ctx->worker_id) {
      os.peer_base[q] = os.buffer;
      os.peer_kind[q] = "self";
      continue;
    }
    std::string where = "worker " + std::to_string(q) + " (" + Text(p.pci, sizeof(p.pci)) + ")";
    if (Text(p.host, sizeof(p.host)) != Text(me.host, sizeof(me.host))) {
      throw std::runtime_error(where + " runs on another host (" + Text(p.host, sizeof(p.host)) + ")");
    }
    int peer_dev = -1;
    if (p.pid == me.pid) {
      peer_dev = p.device;  // an ordinal of this very process
    } else if (l->DeviceGetByPCIBusId(&peer_dev, p.pci) != api::kSuccess) {
      l->GetLastCudaError();
      throw std::runtime_error("the GPU of " + where + " is not visible in this process");
    }
    int can = 0;
    SETUP_CUDA("cudaDeviceCanAccessPeer", l->DeviceCanAccessPeer(&can, ctx->device_id, peer_dev));
    if (!can) {
      throw std::runtime_error("cuda:" + std::to_string(ctx->device_id) + " cannot access the memory of " +
                               where + " (cudaDeviceCanAccessPeer = 0: no NVLink/P2P between them)");
    }
    if (p.pid == me.pid) {
      api::CudaError e = l->DeviceEnablePeerAccess(peer_dev, 0);
      if (static_cast<int>(e) == api::kErrorPeerAccessAlreadyEnabled) {
        l->GetLastCudaError();  // not an error for us; do not leave it for TVM to find
      } else {
        SETUP_CUDA("cudaDeviceEnablePeerAccess", e);
      }
      os.peer_base[q] = reinterpret_cast<char*>(p.ptr);
      os.peer_kind[q] = "peer access";
    } else {
      api::IpcMemHandle handle;
      std::memcpy(&handle, p.ipc, api::kIpcHandleBytes);
      void* ptr = nullptr;
      SETUP_CUDA(("cudaIpcOpenMemHandle of " + where).c_str(),
                 l->IpcOpenMemHandle(&ptr, handle, api::kIpcMemLazyEnablePeerAccess));
      os.peer_base[q] = static_cast<char*>(ptr);
      os.ipc_opened[q] = true;
      os.peer_kind[q] = "cuda ipc";
    }
  }
  OneShotArgs& a = os.args;
  a = OneShotArgs{};
  a.slot_bytes = os.layout.slot_bytes;
  for (int q = 0; q < ctx->num_workers; ++q) {
    a.data[q] = os.peer_base[q] + os.layout.data_offset;
    a.flags[q] = reinterpret_cast<uint64_t*>(os.peer_base[q] + os.layout.flags_offset);
    a.abort_word[q] = reinterpret_cast<uint32_t*>(os.peer_base[q]);
  }
  a.epochs = os.epochs;
  a.host_error = os.host_error_dev;
  a.timeout_ns = static_cast<uint64_t>(os.timeout_s * 1e9);
  a.rank = ctx->worker_id;
  a.nranks = ctx->num_workers;
  a.max_blocks = os.layout.max_blocks;
}

/*!
 * \brief Worker side of the one-shot set-up.  Every rank takes the same branches up to the
 * two exchanges (they depend only on what the controller sent), so the NCCL calls match; after
 * the second exchange every rank knows whether *all* ranks are ready, and the path is on
 * everywhere or nowhere.  Failures are recorded in `reason`, never thrown (NCCL stays).
 */
void SetupOneShot(Context* ctx, const ffi::Shape& cfg, const std::string& kernel,
                  const std::string& note) {
  OneShot& os = ctx->oneshot;
  const bool enabled = cfg.size() >= 3 && cfg[0] != 0;
  os.capacity = cfg.size() >= 3 ? cfg[1] : 0;
  os.max_bytes = os.capacity;
  os.timeout_s = cfg.size() >= 3 ? static_cast<double>(cfg[2]) / 1000.0 : kOneShotDefaultTimeoutS;
  os.pdl_requested = cfg.size() >= 4 ? cfg[3] != 0 : true;
  os.pdl_note = "not set up";
  const int n = ctx->num_workers;
  if (!enabled) {
    os.reason = note.empty() ? "switched off" : note;
    return;
  }
  if (n < 2) {
    os.reason = "one worker: ncclAllReduce is a copy";
    return;
  }
  if (n > kOneShotMaxRanks) {
    os.reason = std::to_string(n) + " workers: the one-shot path serves at most " +
                std::to_string(kOneShotMaxRanks);
    return;
  }
  if (kernel.empty()) {
    os.reason = note;
    return;
  }
  os.kernel_note = note;
  OneShotPeerRecord mine;
  std::memset(&mine, 0, sizeof(mine));
  mine.version = kOneShotLayoutVersion;
  mine.pid = static_cast<int32_t>(getpid());
  mine.device = ctx->device_id;
  CopyText(mine.host, sizeof(mine.host), HostId());
  std::string why;
  try {
    OneShotLocalSetup(ctx, kernel, &mine);
  } catch (const std::exception& e) {
    why = e.what();
  }
  mine.ok = why.empty() ? 1 : 0;
  CopyText(mine.why, sizeof(mine.why), why);
  std::vector<OneShotPeerRecord> all = AllGatherRecords(ctx, mine);
  std::string failed;
  for (int q = 0; q < n && failed.empty(); ++q) {
    if (!all[q].ok) failed = "worker " + std::to_string(q) + ": " + Text(all[q].why, sizeof(all[q].why));
  }
  if (failed.empty()) {
    try {
      OneShotMapPeers(ctx, all);
    } catch (const std::exception& e) {
      failed = "worker " + std::to_string(ctx->worker_id) + ": " + e.what();
    }
  }
  OneShotVerdict v;
  std::memset(&v, 0, sizeof(v));
  v.ok = failed.empty() ? 1 : 0;
  CopyText(v.why, sizeof(v.why), failed);
  std::vector<OneShotVerdict> verdicts = AllGatherRecords(ctx, v);
  std::string final_why;
  for (int q = 0; q < n && final_why.empty(); ++q) {
    if (!verdicts[q].ok) final_why = Text(verdicts[q].why, sizeof(verdicts[q].why));
  }
  if (!final_why.empty()) {
    ReleaseOneShot(&os);
    os.reason = "set-up failed, " + final_why;
    return;
  }
  os.active = os.enabled = true;
  int ipc = 0, peer = 0;
  for (const std::string& k : os.peer_kind) {
    ipc += k == "cuda ipc";
    peer += k == "peer access";
  }
  std::ostringstream r;
  r << n << " ranks on this host with peer access (" << ipc << " peers through CUDA IPC, " << peer
    << " through peer access in this process)";
  os.reason = r.str();
}

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
  // The one-shot all-reduce: the controller decides and compiles, the workers set up.
  OneShotConfig oc = ResolveOneShotConfig();
  std::string kernel, note = oc.why_off;
  if (oc.enabled && num_workers >= 2 && num_workers <= kOneShotMaxRanks) {
    kernel = CompileOneShotKernel(&note);
  }
  // (enabled, max_bytes, timeout in ms, pdl)
  ffi::Shape oneshot_cfg({oc.enabled ? 1 : 0, oc.max_bytes,
                          static_cast<int64_t>(oc.timeout_s * 1000.0 + 0.5), oc.pdl ? 1 : 0});
  DRef func = sess->GetGlobalFunc("runtime.disco." MLC_CCL_NAME ".init_ccl_per_worker");
  // Workers open the libraries the controller opened (same files, same versions).
  sess->CallPacked(func, device_ids, id_bytes, ffi::String(libs->nccl_path),
                   ffi::String(libs->cudart_path), disable_nvls, oneshot_cfg,
                   ffi::Bytes(kernel), ffi::String(note));
  for (int i = 0; i < num_workers; ++i) sess->SyncWorker(i);  // surfaces a worker's error
}

/*! \brief Worker side: device, stream, communicator(s), the one-shot path; makes this the
 * worker's CCL. */
void InitCCLPerWorker(ffi::Shape device_ids, ffi::Bytes id_bytes, ffi::String nccl_path,
                      ffi::String cudart_path, bool disable_nvls, ffi::Shape oneshot_cfg,
                      ffi::Bytes oneshot_kernel, ffi::String oneshot_note) {
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
  SetupOneShot(ctx.get(), oneshot_cfg, std::string(oneshot_kernel.data(), oneshot_kernel.size()),
               std::string(oneshot_note));
  tls_context = std::move(ctx);  // replaces (and destroys) a previous communicator, if any
  worker->ccl = MLC_CCL_NAME;
}

// ------------------------------------------------------------------------------------------
// Collectives
// ------------------------------------------------------------------------------------------

/*! \brief "" while no one-shot kernel of this worker has failed, else what happened. */
std::string OneShotError(const Context* ctx) {
  const OneShot& os = ctx->oneshot;
  if (os.host_error == nullptr) return "";
  const volatile uint32_t* h = os.host_error;  // written by the kernel over PCIe
  uint32_t code = h[0];
  if (code == 0) return "";
  std::ostringstream m;
  m << "one-shot all-reduce on worker " << ctx->worker_id << " (cuda:" << ctx->device_id << ") ";
  if (code == 1) {
    m << "timed out after " << os.timeout_s << " s waiting for worker " << h[1] << " (block "
      << h[2] << ", call " << h[3] << " of that block): that worker stopped, died, or is far "
      << "behind (raise MLC_NCCL_ONESHOT_TIMEOUT_S if it was only slow)";
  } else {
    m << "stopped because worker " << h[1] << " had timed out waiting for a peer";
  }
  m << ". The results of the all-reduces since then are invalid and the one-shot path of this "
       "communicator stays off; MLC_NCCL_ONESHOT=0 uses NCCL alone.";
  return m.str();
}

void CheckOneShotError(const Context* ctx, const char* op) {
  std::string e = OneShotError(ctx);
  if (!e.empty()) CCL_ERROR << op << ": " << e;
}

size_t ElemBytes(DLDataType t) { return (static_cast<size_t>(t.bits) * t.lanes + 7) / 8; }

/*!
 * \brief Launch the one-shot kernel if this call qualifies (see the top of the file); false
 * sends it to NCCL.  Every rank takes the same decision: it depends on the op, dtype, size and
 * switches only, which SPMD programs share (pointer alignment only picks the kernel's loads).
 */
bool TryOneShot(Context* ctx, const Tensor& send, int kind, bool in_group, const Tensor& recv,
                int64_t n) {
  OneShot& os = ctx->oneshot;
  if (!os.active || !os.enabled) return false;
  if (in_group && ctx->num_groups > 1) return false;
  const DLDataType t = send->dtype;
  if (t.code != recv->dtype.code || t.bits != recv->dtype.bits || t.lanes != recv->dtype.lanes) {
    return false;
  }
  if (send->device.device_id != ctx->device_id || recv->device.device_id != ctx->device_id) {
    return false;
  }
  int which = -1;
  const int64_t nbytes = n * static_cast<int64_t>(ElemBytes(t));
  if (!OneShotEligible(kind, t, nbytes, os.max_bytes, &which).empty()) return false;
  CheckOneShotError(ctx, "allreduce");
  OneShotArgs a = os.args;
  a.send = DataPtr(send);
  a.recv = DataPtr(recv);
  a.nbytes = static_cast<uint64_t>(nbytes);
  a.send_aligned = reinterpret_cast<uintptr_t>(a.send) % 16 == 0;
  a.recv_aligned = reinterpret_cast<uintptr_t>(a.recv) % 16 == 0;
  void* params[] = {&a};
  Driver* d = g_driver;
  api::CuContext current = nullptr;
  d->CtxGetCurrent(&current);
  if (current != os.cu_ctx) d->CtxSetCurrent(os.cu_ctx);  // (TVM keeps it current: rare)
  const unsigned blocks = OneShotBlocks(a.nbytes, os.layout.max_blocks);
  api::CuResult r;
  if (os.pdl) {  // may start before the kernel before it ends: the kernel waits (griddepcontrol)
    api::LaunchAttribute attr;
    std::memset(&attr, 0, sizeof(attr));
    attr.id = static_cast<decltype(attr.id)>(api::kLaunchAttributeProgrammaticStreamSerialization);
    attr.value.programmaticStreamSerializationAllowed = 1;
    api::LaunchConfig cfg;
    std::memset(&cfg, 0, sizeof(cfg));
    cfg.gridDimX = blocks;
    cfg.gridDimY = cfg.gridDimZ = 1;
    cfg.blockDimX = kOneShotThreads;
    cfg.blockDimY = cfg.blockDimZ = 1;
    cfg.sharedMemBytes = 0;
    cfg.hStream = ctx->stream();
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
    r = d->LaunchKernelEx(&cfg, os.fn[which], params, nullptr);
  } else {
    r = d->LaunchKernel(os.fn[which], blocks, 1, 1, kOneShotThreads, 1, 1, 0, ctx->stream(),
                        params, nullptr);
  }
  if (current != os.cu_ctx && current != nullptr) d->CtxSetCurrent(current);
  if (static_cast<int>(r) != api::kSuccess) {
    CCL_ERROR << "allreduce: " << (os.pdl ? "cuLaunchKernelEx(" : "cuLaunchKernel(")
              << kOneShotKernels[which] << "): " << CuErrorText(r);
  }
  ++os.oneshot_calls;
  return true;
}

void AllReduce(Tensor send, int kind, bool in_group, Tensor recv) {
  Context* ctx = Ctx("allreduce");
  CheckCuda(send, "allreduce", "send");
  CheckCuda(recv, "allreduce", "recv");
  int64_t n = Numel(send);
  if (Numel(recv) != n) CCL_ERROR << "allreduce: send has " << n << " elements, recv " << Numel(recv);
  if (TryOneShot(ctx, send, kind, in_group, recv, n)) return;
  ++ctx->oneshot.nccl_calls;
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
  CheckOneShotError(ctx, "sync_worker");  // a one-shot kernel that gave up says so here
}

/*! \brief The all-reduce path of this worker, as JSON (debug_allreduce_path). */
std::string AllReducePathJson(const Context* ctx) {
  const OneShot& os = ctx->oneshot;
  std::ostringstream j;
  j << "{\"path\": \"" << (os.active && os.enabled ? "oneshot" : "nccl") << "\""
    << ", \"set_up\": " << (os.active ? "true" : "false")
    << ", \"enabled\": " << (os.enabled ? "true" : "false")
    << ", \"reason\": \"" << JsonEscape(os.reason) << "\""
    << ", \"kernel\": \"" << JsonEscape(os.kernel_note) << "\""
    << ", \"worker\": " << ctx->worker_id << ", \"workers\": " << ctx->num_workers
    << ", \"device\": " << ctx->device_id << ", \"max_bytes\": " << os.max_bytes
    << ", \"capacity_bytes\": " << os.capacity << ", \"timeout_s\": " << os.timeout_s
    << ", \"max_blocks\": " << os.layout.max_blocks << ", \"threads\": " << kOneShotThreads
    << ", \"pdl\": " << (os.pdl ? "true" : "false")
    << ", \"pdl_supported\": " << (os.pdl_supported ? "true" : "false")
    << ", \"pdl_note\": \"" << JsonEscape(os.pdl_note) << "\""
    << ", \"peers\": [";
  for (size_t q = 0; q < os.peer_kind.size(); ++q) {
    j << (q ? ", " : "") << "\"" << os.peer_kind[q] << "\"";
  }
  j << "], \"oneshot_calls\": " << os.oneshot_calls << ", \"nccl_calls\": " << os.nccl_calls
    << ", \"error\": \"" << JsonEscape(OneShotError(ctx)) << "\"}";
  return j.str();
}

/*!
 * \brief Switch the path of this worker at run time: "oneshot" (only if it was set up),
 * "nccl"; `max_bytes` >= 0 sets the threshold (at most the capacity set at init).  Call it on
 * every worker between the same two collectives (a disco call does), or the ranks disagree.
 * Calls already captured in a CUDA graph keep the path they were captured with.
 */
std::string SetAllReducePath(ffi::String mode, int64_t max_bytes) {
  Context* ctx = Ctx("debug_set_allreduce_path");
  OneShot& os = ctx->oneshot;
  std::string m(mode);
  if (m == "oneshot") {
    if (!os.active) CCL_ERROR << "the one-shot all-reduce is not set up: " << os.reason;
    os.enabled = true;
  } else if (m == "nccl") {
    os.enabled = false;
  } else if (!m.empty()) {
    CCL_ERROR << "debug_set_allreduce_path: mode must be 'oneshot' or 'nccl' (or ''), not '" << m << "'";
  }
  if (max_bytes >= 0) {
    if (max_bytes > os.capacity) {
      CCL_ERROR << "debug_set_allreduce_path: max_bytes " << max_bytes << " > the "
                << os.capacity << " bytes set up at init (MLC_NCCL_ONESHOT_MAX_BYTES)";
    }
    os.max_bytes = max_bytes;
  }
  return AllReducePathJson(ctx);
}

/*!
 * \brief Switch programmatic dependent launch of this worker's one-shot kernel: 1 on (only where
 * supported, see DecideOneShotPdl), 0 off (plain cuLaunchKernel).  Calls already captured in a
 * CUDA graph keep the launch they were captured with.  Returns AllReducePathJson.
 */
std::string SetOneShotPdl(int64_t on) {
  Context* ctx = Ctx("debug_set_oneshot_pdl");
  OneShot& os = ctx->oneshot;
  if (on != 0 && !os.pdl_supported) {
    CCL_ERROR << "debug_set_oneshot_pdl: programmatic dependent launch is not available: "
              << os.pdl_note;
  }
  os.pdl = on != 0;
  return AllReducePathJson(ctx);
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
      .def("runtime.disco." MLC_CCL_NAME ".debug_bench_allreduce", BenchAllReduce)
      // --- the one-shot all-reduce ---
      // Controller: the settings the next init_ccl hands to the workers. mode: 1 on, 0 off,
      // -1 from MLC_NCCL_ONESHOT; max_bytes < 0 / timeout_s <= 0: from the environment.
      .def("runtime.disco." MLC_CCL_NAME ".configure_oneshot",
           [](int64_t mode, int64_t max_bytes, double timeout_s) {
             std::lock_guard<std::mutex> lock(g_config_mutex);
             g_oneshot_mode = static_cast<int>(mode);
             g_oneshot_max_bytes = max_bytes;
             g_oneshot_timeout_s = timeout_s;
           })
      // Controller: programmatic dependent launch of the one-shot kernel for the next init_ccl
      // (1 on where the GPU can, 0 off, -1 from MLC_NCCL_ONESHOT_PDL, default off).
      .def("runtime.disco." MLC_CCL_NAME ".configure_oneshot_pdl",
           [](int64_t mode) {
             std::lock_guard<std::mutex> lock(g_config_mutex);
             g_oneshot_pdl = mode < 0 ? -1 : (mode != 0 ? 1 : 0);
           })
      // Worker: PDL on (1) or off (0) for this worker's later one-shot launches (A/B timing).
      .def("runtime.disco." MLC_CCL_NAME ".debug_set_oneshot_pdl", SetOneShotPdl)
      // Worker: which path sum all-reduces take and why, as JSON (see AllReducePathJson).
      .def("runtime.disco." MLC_CCL_NAME ".debug_allreduce_path",
           []() -> ffi::String { return AllReducePathJson(Ctx("debug_allreduce_path")); })
      .def("runtime.disco." MLC_CCL_NAME ".debug_set_allreduce_path", SetAllReducePath)
      // The kernel's CUDA C++ (what init compiles through tvm_callback_cuda_compile).
      .def("runtime.disco." MLC_CCL_NAME ".oneshot_source",
           []() -> ffi::String { return ffi::String(kOneShotSource); })
      // Controller: compile the kernel as init_ccl would; JSON {"bytes": n, "note": "..."}.
      .def("runtime.disco." MLC_CCL_NAME ".oneshot_compile",
           []() -> ffi::String {
             std::string note;
             std::string bin = CompileOneShotKernel(&note);
             return "{\"bytes\": " + std::to_string(bin.size()) + ", \"note\": \"" +
                    JsonEscape(note) + "\"}";
           })
      // The pure parts, for tests without a GPU: "" or why a call would go to NCCL ...
      .def("runtime.disco." MLC_CCL_NAME ".oneshot_eligible",
           [](int64_t kind, DLDataType dtype, int64_t nbytes, int64_t max_bytes) -> ffi::String {
             return OneShotEligible(static_cast<int>(kind), dtype, nbytes, max_bytes, nullptr);
           })
      // ... and (blocks, threads, max_blocks, slot_bytes, flags_offset, data_offset,
      // total_bytes) of a call of `nbytes` with `nranks` ranks and `capacity` bytes per slot.
      .def("runtime.disco." MLC_CCL_NAME ".oneshot_plan",
           [](int64_t nbytes, int64_t nranks, int64_t capacity) -> ffi::Shape {
             OneShotLayout l = PlanOneShotLayout(static_cast<int>(nranks), capacity);
             return ffi::Shape({static_cast<int64_t>(OneShotBlocks(nbytes, l.max_blocks)),
                                kOneShotThreads, l.max_blocks,
                                static_cast<int64_t>(l.slot_bytes),
                                static_cast<int64_t>(l.flags_offset),
                                static_cast<int64_t>(l.data_offset),
                                static_cast<int64_t>(l.total_bytes)});
           });
}

}  // namespace nccl_ccl
}  // namespace mlc_course
