/*
 * cpu_shm: a collective communication library (CCL) for TVM disco workers that run on CPU.
 *
 * Part of mlc_course.  Written for the course against the public disco CCL contract of
 * apache-tvm 0.27 (the functions `runtime.disco.<ccl>.<op>` that the disco builtins such as
 * `runtime.disco.allreduce` look up through the worker's `ccl` field); no TVM code is copied.
 *
 * How it works
 * ------------
 * The controller's `init_ccl` creates one POSIX shared-memory segment (shm_open + mmap) per
 * session, with a unique name, and asks every worker to map it (`init_ccl_per_worker`).  Once
 * all workers have mapped it the name is unlinked, so nothing is left in /dev/shm even if a
 * process crashes later.  The same code serves both kinds of sessions:
 *   - ThreadedSession: workers are threads of one process; each maps the segment once.
 *   - ProcessSession: worker 0 is a thread of the controller, workers 1..N-1 are processes.
 *
 * A communicator (the global one, plus one per worker group when num_groups > 1) owns a
 * barrier and a data area of 2 x nranks "slots" of `slot_bytes` each (double buffering: step s
 * uses buffer s % 2, so one barrier per step is enough to stop a fast rank from overwriting
 * data a slow rank still reads).  Big tensors are processed in chunks of one slot.
 *
 *   all-reduce (per chunk): every rank copies its chunk into its slot; barrier; rank r reduces
 *     its 1/N slice across all slots (a reduce-scatter) into slot 0; barrier; every rank copies
 *     the whole reduced chunk out of slot 0.  Each element is reduced once, by one rank, in the
 *     fixed order slot 0, 1, ..., N-1, so all ranks get bitwise identical results.
 *     float16/bfloat16 are accumulated in float32 and rounded once (round-to-nearest-even).
 *   broadcast / scatter / gather / all-gather: copy into slots; barrier; copy out.
 *   send/recv: one single-buffer mailbox per ordered pair of workers.
 *
 * The barrier is a generation-counting barrier on atomics in the shared segment: waiters spin
 * for a few microseconds, then sleep on a futex (shared, not private: it works across
 * processes).  It never waits forever: every ~50 ms a waiter checks whether a peer process has
 * died (pid + start time recorded at attach) and after `timeout` it gives up.  Either way it
 * marks the segment as aborted (so every other rank fails fast too) and throws a tvm Error.
 *
 * NOTE (TVM 0.27): the disco worker loop does not catch exceptions.  An error thrown in a worker
 * *thread* (every ThreadedSession worker, and worker 0 of a ProcessSession) therefore reaches
 * std::terminate and aborts the hosting process after printing the message; a worker process
 * prints the traceback and exits.  That is still much better than hanging forever.
 */
#include <dlpack/dlpack.h>
#include <fcntl.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <linux/futex.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/reflection/registry.h>
#include <tvm/runtime/disco/builtin.h>
#include <tvm/runtime/disco/disco_worker.h>
#include <tvm/runtime/disco/session.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#ifndef MLC_CCL_NAME
#define MLC_CCL_NAME "cpu_shm"
#endif

namespace mlc_course {
namespace ccl {

using tvm::runtime::DiscoWorker;
using tvm::runtime::DRef;
using tvm::runtime::ReduceKind;
using tvm::runtime::Session;
using tvm::runtime::Tensor;
namespace ffi = tvm::ffi;

constexpr uint64_t kMagic = 0x4d4c43434c53484dULL;  // "MLCCLSHM"
constexpr uint32_t kVersion = 1;
constexpr int kMaxWorkers = 64;
constexpr size_t kAlign = 64;      // cache line
constexpr size_t kPage = 4096;

#define CCL_ERROR TVM_FFI_THROW(RuntimeError) << "[" MLC_CCL_NAME "] "

// ------------------------------------------------------------------------------------------
// Shared-memory layout
// ------------------------------------------------------------------------------------------

struct alignas(kAlign) BarrierWords {
  std::atomic<uint32_t> count;       // ranks arrived in the current generation
  char pad0[kAlign - sizeof(std::atomic<uint32_t>)];
  std::atomic<uint32_t> generation;  // futex word: bumped by the last rank to arrive
  std::atomic<uint32_t> sleepers;    // ranks (possibly) sleeping on `generation`
  char pad1[kAlign - 2 * sizeof(std::atomic<uint32_t>)];
};

struct alignas(kAlign) MailboxHeader {
  std::atomic<uint32_t> written;     // futex word the receiver sleeps on
  std::atomic<uint32_t> sleepers_w;
  char pad0[kAlign - 2 * sizeof(std::atomic<uint32_t>)];
  std::atomic<uint32_t> read;        // futex word the sender sleeps on
  std::atomic<uint32_t> sleepers_r;
  uint64_t nbytes;                   // size of the message chunk in the buffer
  char pad1[kAlign - 2 * sizeof(std::atomic<uint32_t>) - sizeof(uint64_t)];
};

struct alignas(kAlign) SegmentHeader {
  uint64_t magic;
  uint32_t version;
  int32_t num_workers;
  int32_t num_groups;
  int32_t reserved;
  uint64_t slot_bytes;
  uint64_t p2p_bytes;
  uint64_t total_bytes;
  std::atomic<uint32_t> attached;    // number of workers that mapped the segment
  std::atomic<uint32_t> aborted;     // 0: fine, 1: being written, 2: error message ready
  int32_t pids[kMaxWorkers];
  uint64_t start_times[kMaxWorkers];  // from /proc/<pid>/stat, guards against pid reuse
  char error[1024];
};

static_assert(std::atomic<uint32_t>::is_always_lock_free, "need address-free atomics");

inline size_t RoundUp(size_t x, size_t a) { return (x + a - 1) / a * a; }

/*! \brief Byte offsets of everything inside a segment; a pure function of the sizes. */
struct Layout {
  int num_workers, num_groups, group_size;
  size_t slot_bytes, p2p_bytes;
  size_t comm_data_bytes(int nranks) const { return 2 * static_cast<size_t>(nranks) * slot_bytes; }
  size_t comm_bytes(int nranks) const { return kPage + RoundUp(comm_data_bytes(nranks), kPage); }
  size_t header_bytes() const { return RoundUp(sizeof(SegmentHeader), kPage); }
  size_t global_comm_offset() const { return header_bytes(); }
  size_t group_comm_offset(int g) const {
    return global_comm_offset() + comm_bytes(num_workers) + g * comm_bytes(group_size);
  }
  size_t num_group_comms() const { return num_groups > 1 ? num_groups : 0; }
  size_t mailbox_bytes() const { return kPage + RoundUp(p2p_bytes, kPage); }
  size_t mailbox_offset(int src, int dst) const {
    size_t base = group_comm_offset(static_cast<int>(num_group_comms()));
    return base + (static_cast<size_t>(src) * num_workers + dst) * mailbox_bytes();
  }
  size_t total_bytes() const { return mailbox_offset(num_workers, 0); }
};

// ------------------------------------------------------------------------------------------
// Small OS helpers
// ------------------------------------------------------------------------------------------

inline long FutexWait(std::atomic<uint32_t>* addr, uint32_t expected, int64_t timeout_ns) {
  struct timespec ts;
  ts.tv_sec = timeout_ns / 1000000000LL;
  ts.tv_nsec = timeout_ns % 1000000000LL;
  // FUTEX_WAIT without FUTEX_PRIVATE_FLAG: the word lives in memory shared between processes.
  return syscall(SYS_futex, reinterpret_cast<uint32_t*>(addr), FUTEX_WAIT, expected, &ts, nullptr,
                 0);
}

inline void FutexWakeAll(std::atomic<uint32_t>* addr) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(addr), FUTEX_WAKE,
          std::numeric_limits<int>::max(), nullptr, nullptr, 0);
}

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

/*! \brief Start time of a process (clock ticks since boot), 0 if it does not exist. */
uint64_t ProcessStartTime(int pid, char* state_out = nullptr) {
  char path[64];
  std::snprintf(path, sizeof(path), "/proc/%d/stat", pid);
  std::ifstream f(path);
  if (!f) return 0;
  std::string line;
  std::getline(f, line);
  size_t rparen = line.rfind(')');
  if (rparen == std::string::npos) return 0;
  std::istringstream rest(line.substr(rparen + 2));
  std::string field;
  // field 3 is the state; field 22 is the start time.
  std::vector<std::string> fields;
  while (rest >> field) fields.push_back(field);
  if (fields.size() < 20) return 0;
  if (state_out != nullptr) *state_out = fields[0].empty() ? '?' : fields[0][0];
  return std::strtoull(fields[19].c_str(), nullptr, 10);
}

/*! \brief True if the process is gone (or a zombie, or its pid was reused). */
bool ProcessDead(int pid, uint64_t start_time) {
  if (pid <= 0) return false;
  if (kill(pid, 0) != 0 && errno == ESRCH) return true;
  char state = '?';
  uint64_t now_start = ProcessStartTime(pid, &state);
  if (now_start == 0) return true;
  if (state == 'Z' || state == 'X') return true;
  return start_time != 0 && now_start != start_time;
}

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// ------------------------------------------------------------------------------------------
// Element types and reductions
// ------------------------------------------------------------------------------------------

inline float HalfToFloat(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      int e = -1;
      do {
        ++e;
        mant <<= 1;
      } while ((mant & 0x400u) == 0);
      bits = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (mant & 0x3ffu) << 13;
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | mant << 13;
  } else {
    bits = sign | (exp + 127 - 15) << 23 | mant << 13;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t FloatToHalf(float f) {  // round to nearest, ties to even
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t absx = x & 0x7fffffffu;
  if (absx >= 0x7f800000u) {  // inf or nan
    return static_cast<uint16_t>(sign | 0x7c00u | (absx > 0x7f800000u ? 0x200u : 0));
  }
  if (absx >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow -> inf
  if (absx < 0x38800000u) {  // result is subnormal or zero
    if (absx < 0x33000000u) return static_cast<uint16_t>(sign);  // < half of smallest subnormal
    uint32_t e = absx >> 23;
    uint32_t mant = (absx & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126 - e;  // 14 - (e - 127) + 13 - 1 ... keeps 10 bits + rounding
    uint32_t q = mant >> shift;
    uint32_t rem = mant & ((1u << shift) - 1);
    uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return static_cast<uint16_t>(sign | q);
  }
  uint32_t q = absx - 0x38000000u;  // rebias exponent 127 -> 15
  uint32_t rem = q & 0x1fffu;
  q >>= 13;
  if (rem > 0x1000u || (rem == 0x1000u && (q & 1u))) ++q;  // may carry into exponent: fine
  return static_cast<uint16_t>(sign | q);
}

inline float BF16ToFloat(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t FloatToBF16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // nan
  x += 0x7fffu + ((x >> 16) & 1u);
  return static_cast<uint16_t>(x >> 16);
}

/*! \brief Storage type T, accumulator type A, and the conversions between them. */
template <typename T, typename A>
struct PlainCodec {
  using Storage = T;
  using Acc = A;
  static A Load(T v) { return static_cast<A>(v); }
  static T Store(A v) { return static_cast<T>(v); }
};
struct HalfCodec {
  using Storage = uint16_t;
  using Acc = float;
  static float Load(uint16_t v) { return HalfToFloat(v); }
  static uint16_t Store(float v) { return FloatToHalf(v); }
};
struct BF16Codec {
  using Storage = uint16_t;
  using Acc = float;
  static float Load(uint16_t v) { return BF16ToFloat(v); }
  static uint16_t Store(float v) { return FloatToBF16(v); }
};

/*!
 * \brief dst[i] = op(src_0[i], ..., src_{n-1}[i]) for i < count, accumulating in Codec::Acc.
 * dst may alias src_0 (it is slot 0 of the communicator).  Works block by block so that the
 * inner loops are simple and vectorisable.
 */
template <typename Codec>
void ReduceSlice(const uint8_t* const* srcs, int nsrc, uint8_t* dst_bytes, int64_t count,
                 ReduceKind kind) {
  using T = typename Codec::Storage;
  using A = typename Codec::Acc;
  constexpr int64_t kBlock = 1024;
  A acc[kBlock];
  T* dst = reinterpret_cast<T*>(dst_bytes);
  for (int64_t base = 0; base < count; base += kBlock) {
    int64_t n = std::min(kBlock, count - base);
    const T* s0 = reinterpret_cast<const T*>(srcs[0]) + base;
    for (int64_t i = 0; i < n; ++i) acc[i] = Codec::Load(s0[i]);
    for (int k = 1; k < nsrc; ++k) {
      const T* sk = reinterpret_cast<const T*>(srcs[k]) + base;
      switch (kind) {
        case ReduceKind::kSum:
        case ReduceKind::kAvg:
          for (int64_t i = 0; i < n; ++i) acc[i] += Codec::Load(sk[i]);
          break;
        case ReduceKind::kProd:
          for (int64_t i = 0; i < n; ++i) acc[i] *= Codec::Load(sk[i]);
          break;
        case ReduceKind::kMin:
          for (int64_t i = 0; i < n; ++i) {
            A v = Codec::Load(sk[i]);
            acc[i] = v < acc[i] ? v : acc[i];
          }
          break;
        case ReduceKind::kMax:
          for (int64_t i = 0; i < n; ++i) {
            A v = Codec::Load(sk[i]);
            acc[i] = v > acc[i] ? v : acc[i];
          }
          break;
      }
    }
    if (kind == ReduceKind::kAvg) {
      for (int64_t i = 0; i < n; ++i) acc[i] = acc[i] / static_cast<A>(nsrc);
    }
    for (int64_t i = 0; i < n; ++i) dst[base + i] = Codec::Store(acc[i]);
  }
}

using ReduceFn = void (*)(const uint8_t* const*, int, uint8_t*, int64_t, ReduceKind);

#if defined(__x86_64__)
/*!
 * \brief float16 reduction with the F16C conversion instructions (8 lanes at a time), used when
 * the CPU has them.  Same numerics as ReduceSlice<HalfCodec>: exact half->float, accumulate in
 * float in slot order, one round-to-nearest-even float->half at the end.
 */
__attribute__((target("avx2,f16c"))) void ReduceHalfF16C(const uint8_t* const* srcs, int nsrc,
                                                         uint8_t* dst, int64_t count,
                                                         ReduceKind kind) {
  int64_t i = 0;
  const __m256 n_f = _mm256_set1_ps(static_cast<float>(nsrc));
  for (; i + 8 <= count; i += 8) {
    __m256 acc = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(srcs[0] + 2 * i)));
    for (int k = 1; k < nsrc; ++k) {
      __m256 v =
          _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(srcs[k] + 2 * i)));
      switch (kind) {
        case ReduceKind::kSum:
        case ReduceKind::kAvg:
          acc = _mm256_add_ps(acc, v);
          break;
        case ReduceKind::kProd:
          acc = _mm256_mul_ps(acc, v);
          break;
        case ReduceKind::kMin:
          acc = _mm256_min_ps(v, acc);
          break;
        case ReduceKind::kMax:
          acc = _mm256_max_ps(v, acc);
          break;
      }
    }
    if (kind == ReduceKind::kAvg) acc = _mm256_div_ps(acc, n_f);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 2 * i),
                     _mm256_cvtps_ph(acc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  if (i < count) {
    const uint8_t* tail[kMaxWorkers];
    for (int k = 0; k < nsrc; ++k) tail[k] = srcs[k] + 2 * i;
    ReduceSlice<HalfCodec>(tail, nsrc, dst + 2 * i, count - i, kind);
  }
}

bool HaveF16C() {
  static const bool have = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") &&
                           std::getenv("MLC_CCL_NO_F16C") == nullptr;
  return have;
}
#endif

ReduceFn GetReduceFn(DLDataType dtype) {
  if (dtype.lanes != 1) return nullptr;
  switch (dtype.code) {
    case kDLFloat:
      if (dtype.bits == 32) return ReduceSlice<PlainCodec<float, float>>;
      if (dtype.bits == 64) return ReduceSlice<PlainCodec<double, double>>;
      if (dtype.bits == 16) {
#if defined(__x86_64__)
        if (HaveF16C()) return ReduceHalfF16C;
#endif
        return ReduceSlice<HalfCodec>;
      }
      return nullptr;
    case kDLBfloat:
      if (dtype.bits == 16) return ReduceSlice<BF16Codec>;
      return nullptr;
    case kDLInt:
      if (dtype.bits == 32) return ReduceSlice<PlainCodec<int32_t, int32_t>>;
      if (dtype.bits == 64) return ReduceSlice<PlainCodec<int64_t, int64_t>>;
      if (dtype.bits == 8) return ReduceSlice<PlainCodec<int8_t, int32_t>>;
      return nullptr;
    case kDLUInt:
      if (dtype.bits == 32) return ReduceSlice<PlainCodec<uint32_t, uint32_t>>;
      if (dtype.bits == 8) return ReduceSlice<PlainCodec<uint8_t, uint32_t>>;
      return nullptr;
  }
  return nullptr;
}

std::string DTypeStr(DLDataType t) {
  std::ostringstream os;
  os << ffi::DLDataTypeToString(t);
  return os.str();
}

// ------------------------------------------------------------------------------------------
// Configuration handed from the controller to the next init_ccl
// ------------------------------------------------------------------------------------------

struct Config {
  int64_t timeout_ms = 10000;
  int64_t slot_bytes = 1 << 20;
  int64_t p2p_bytes = 256 << 10;
  int64_t spin_us = 20;
};

std::mutex g_config_mutex;
Config g_next_config;

// ------------------------------------------------------------------------------------------
// The per-worker state
// ------------------------------------------------------------------------------------------

struct Comm {
  BarrierWords* bar = nullptr;
  uint8_t* data = nullptr;   // 2 * nranks * slot_bytes
  int nranks = 0;
  int rank = 0;
  int first_global = 0;      // global id of rank 0 of this communicator
  uint64_t step = 0;         // selects the buffer (step % 2)
  uint8_t* slot(uint64_t s, int r, size_t slot_bytes) const {
    return data + ((s % 2) * nranks + r) * slot_bytes;
  }
};

class Context;
thread_local std::unique_ptr<Context> tls_context;

class Context {
 public:
  Context(std::string name, int worker_id, int num_workers, int num_groups, const Config& cfg)
      : name_(std::move(name)), worker_id_(worker_id), num_workers_(num_workers),
        num_groups_(num_groups), cfg_(cfg) {}

  ~Context() {
    if (base_ != nullptr) munmap(base_, map_bytes_);
  }

  void Attach() {
    int fd = shm_open(name_.c_str(), O_RDWR, 0600);
    if (fd < 0) {
      CCL_ERROR << "worker " << worker_id_ << ": shm_open(" << name_
                << ") failed: " << std::strerror(errno);
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || st.st_size < static_cast<off_t>(sizeof(SegmentHeader))) {
      close(fd);
      CCL_ERROR << "worker " << worker_id_ << ": shared segment " << name_ << " is too small";
    }
    map_bytes_ = static_cast<size_t>(st.st_size);
    void* p = mmap(nullptr, map_bytes_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (p == MAP_FAILED) {
      CCL_ERROR << "worker " << worker_id_ << ": mmap(" << name_
                << ") failed: " << std::strerror(errno);
    }
    base_ = static_cast<uint8_t*>(p);
    hdr_ = reinterpret_cast<SegmentHeader*>(base_);
    if (hdr_->magic != kMagic || hdr_->version != kVersion) {
      CCL_ERROR << "shared segment " << name_ << " has a bad magic/version";
    }
    if (hdr_->num_workers != num_workers_ || hdr_->num_groups != num_groups_) {
      CCL_ERROR << "shared segment " << name_ << " was made for " << hdr_->num_workers
                << " workers / " << hdr_->num_groups << " groups, but this worker sees "
                << num_workers_ << " / " << num_groups_;
    }
    layout_.num_workers = num_workers_;
    layout_.num_groups = num_groups_;
    layout_.group_size = num_workers_ / num_groups_;
    layout_.slot_bytes = hdr_->slot_bytes;
    layout_.p2p_bytes = hdr_->p2p_bytes;
    TVM_FFI_ICHECK_EQ(layout_.total_bytes(), hdr_->total_bytes);

    int pid = static_cast<int>(getpid());
    hdr_->pids[worker_id_] = pid;
    hdr_->start_times[worker_id_] = ProcessStartTime(pid);

    global_ = MakeComm(layout_.global_comm_offset(), num_workers_, worker_id_, 0);
    if (num_groups_ > 1) {
      int g = worker_id_ / layout_.group_size;
      group_ = MakeComm(layout_.group_comm_offset(g), layout_.group_size,
                        worker_id_ % layout_.group_size, g * layout_.group_size);
    } else {
      group_ = global_;
    }
    hdr_->attached.fetch_add(1, std::memory_order_acq_rel);
  }

  Comm& GetComm(bool in_group) { return (in_group && num_groups_ > 1) ? group_ : global_; }
  bool is_global(const Comm& c) const { return &c == &global_; }
  size_t slot_bytes() const { return layout_.slot_bytes; }
  int worker_id() const { return worker_id_; }
  int num_workers() const { return num_workers_; }
  int group_size() const { return layout_.group_size; }

  // ---- failure handling -------------------------------------------------------------------

  [[noreturn]] void Abort(const std::string& msg) {
    uint32_t expected = 0;
    if (hdr_->aborted.compare_exchange_strong(expected, 1, std::memory_order_acq_rel)) {
      std::snprintf(hdr_->error, sizeof(hdr_->error), "%s", msg.c_str());
      hdr_->aborted.store(2, std::memory_order_release);
      // Say it on stderr too, in one write: in TVM 0.27 the error thrown below ends in
      // std::terminate, and when several worker threads of a process throw at once the C++
      // runtime may abort before it prints any message.
      std::string line = "[" MLC_CCL_NAME "] error: " + msg + "\n";
      ssize_t ignored = write(STDERR_FILENO, line.data(), line.size());
      (void)ignored;
      WakeEveryone();
    }
    CCL_ERROR << msg;
    throw;  // unreachable, CCL_ERROR throws
  }

  void CheckAborted(const char* op) {
    if (hdr_->aborted.load(std::memory_order_acquire) == 0) return;
    // wait (briefly) for the message of whoever aborted
    for (int i = 0; i < 1000 && hdr_->aborted.load(std::memory_order_acquire) != 2; ++i) {
      std::this_thread::yield();
    }
    CCL_ERROR << "worker " << worker_id_ << ": " << op
              << " cancelled because the communicator was aborted: " << hdr_->error;
  }

  void WakeEveryone() {
    FutexWakeAll(&global_.bar->generation);
    if (num_groups_ > 1) {
      for (int g = 0; g < num_groups_; ++g) {
        auto* bar = reinterpret_cast<BarrierWords*>(base_ + layout_.group_comm_offset(g));
        FutexWakeAll(&bar->generation);
      }
    }
    for (int s = 0; s < num_workers_; ++s) {
      for (int d = 0; d < num_workers_; ++d) {
        auto* mb = reinterpret_cast<MailboxHeader*>(base_ + layout_.mailbox_offset(s, d));
        FutexWakeAll(&mb->written);
        FutexWakeAll(&mb->read);
      }
    }
  }

  /*! \brief Checks peers while waiting; throws (after aborting the segment) on failure. */
  void CheckPeers(const char* op, int first, int count, int64_t start_ns) {
    CheckAborted(op);
    int my_pid = static_cast<int>(getpid());
    for (int w = first; w < first + count; ++w) {
      int pid = hdr_->pids[w];
      if (pid == 0 || pid == my_pid) continue;
      if (ProcessDead(pid, hdr_->start_times[w])) {
        std::ostringstream os;
        os << "worker " << worker_id_ << ": " << op << " failed: peer worker " << w << " (pid "
           << pid << ") has died";
        Abort(os.str());
      }
    }
    int64_t waited_ns = NowNs() - start_ns;
    if (waited_ns > cfg_.timeout_ms * 1000000LL) {
      std::ostringstream os;
      os << "worker " << worker_id_ << ": " << op << " timed out after " << waited_ns / 1000000
         << " ms waiting for its peers (timeout_ms=" << cfg_.timeout_ms
         << "); a peer is hung, or did not call the same collective";
      Abort(os.str());
    }
  }

  /*!
   * \brief Waits until *word != seen: spins briefly, yields the core until spin_us has passed,
   * then sleeps on the futex in slices of 50 ms, checking the peers and the timeout between
   * slices.
   */
  void WaitChange(std::atomic<uint32_t>* word, std::atomic<uint32_t>* sleepers, uint32_t seen,
                  const char* op, int first, int count) {
    if (word->load(std::memory_order_acquire) != seen) return;
    int64_t start = NowNs();
    int64_t spin_until = start + cfg_.spin_us * 1000;
    // 1) a short busy spin (the peer is usually a few hundred ns behind) ...
    for (int i = 0; i < 256; ++i) {
      if (word->load(std::memory_order_acquire) != seen) return;
      CpuRelax();
    }
    // 2) ... then yield the core until spin_us (the peer may need this very core: workers
    // often outnumber cores) ...
    while (NowNs() < spin_until) {
      for (int i = 0; i < 16; ++i) {
        if (word->load(std::memory_order_acquire) != seen) return;
        CpuRelax();
      }
      sched_yield();
    }
    // 3) ... then sleep.
    while (true) {
      sleepers->fetch_add(1, std::memory_order_seq_cst);
      if (word->load(std::memory_order_seq_cst) == seen) {
        FutexWait(word, seen, 50 * 1000000LL);
      }
      sleepers->fetch_sub(1, std::memory_order_seq_cst);
      if (word->load(std::memory_order_acquire) != seen) return;
      CheckPeers(op, first, count, start);
    }
  }

  void Barrier(Comm& c, const char* op) {
    if (c.nranks == 1) return;
    BarrierWords* bar = c.bar;
    uint32_t gen = bar->generation.load(std::memory_order_acquire);
    if (bar->count.fetch_add(1, std::memory_order_acq_rel) + 1 == static_cast<uint32_t>(c.nranks)) {
      bar->count.store(0, std::memory_order_relaxed);
      bar->generation.store(gen + 1, std::memory_order_seq_cst);
      if (bar->sleepers.load(std::memory_order_seq_cst) != 0) FutexWakeAll(&bar->generation);
      return;
    }
    WaitChange(&bar->generation, &bar->sleepers, gen, op, c.first_global, c.nranks);
  }

  MailboxHeader* Mailbox(int src, int dst) {
    return reinterpret_cast<MailboxHeader*>(base_ + layout_.mailbox_offset(src, dst));
  }
  uint8_t* MailboxData(int src, int dst) {
    return base_ + layout_.mailbox_offset(src, dst) + kPage;
  }

  void Send(const uint8_t* data, size_t nbytes, int dst, const char* op) {
    MailboxHeader* mb = Mailbox(worker_id_, dst);
    uint8_t* buf = MailboxData(worker_id_, dst);
    size_t cap = layout_.p2p_bytes;
    size_t off = 0;
    do {
      size_t len = std::min(cap, nbytes - off);
      uint32_t w = mb->written.load(std::memory_order_acquire);
      // wait until the receiver has consumed the previous message (read == written)
      while (true) {
        uint32_t r = mb->read.load(std::memory_order_acquire);
        if (r == w) break;
        WaitChange(&mb->read, &mb->sleepers_r, r, op, dst, 1);
      }
      std::memcpy(buf, data + off, len);
      mb->nbytes = len;
      mb->written.store(w + 1, std::memory_order_seq_cst);
      if (mb->sleepers_w.load(std::memory_order_seq_cst) != 0) FutexWakeAll(&mb->written);
      off += len;
    } while (off < nbytes);
  }

  void Recv(uint8_t* data, size_t nbytes, int src, const char* op) {
    MailboxHeader* mb = Mailbox(src, worker_id_);
    const uint8_t* buf = MailboxData(src, worker_id_);
    size_t cap = layout_.p2p_bytes;
    size_t off = 0;
    do {
      size_t len = std::min(cap, nbytes - off);
      uint32_t r = mb->read.load(std::memory_order_acquire);
      while (true) {
        uint32_t w = mb->written.load(std::memory_order_acquire);
        if (w != r) break;
        WaitChange(&mb->written, &mb->sleepers_w, w, op, src, 1);
      }
      if (mb->nbytes != len) {
        std::ostringstream os;
        os << "worker " << worker_id_ << ": " << op << " expected a chunk of " << len
           << " bytes from worker " << src << " but got " << mb->nbytes
           << " (send and receive buffers have different sizes)";
        Abort(os.str());
      }
      std::memcpy(data + off, buf, len);
      mb->read.store(r + 1, std::memory_order_seq_cst);
      if (mb->sleepers_r.load(std::memory_order_seq_cst) != 0) FutexWakeAll(&mb->read);
      off += len;
    } while (off < nbytes);
  }

 private:
  Comm MakeComm(size_t offset, int nranks, int rank, int first_global) {
    Comm c;
    c.bar = reinterpret_cast<BarrierWords*>(base_ + offset);
    c.data = base_ + offset + kPage;
    c.nranks = nranks;
    c.rank = rank;
    c.first_global = first_global;
    return c;
  }

  std::string name_;
  int worker_id_, num_workers_, num_groups_;
  Config cfg_;
  Layout layout_{};
  uint8_t* base_ = nullptr;
  size_t map_bytes_ = 0;
  SegmentHeader* hdr_ = nullptr;
  Comm global_, group_;
};

Context* Ctx(const char* op) {
  Context* ctx = tls_context.get();
  if (ctx == nullptr) {
    CCL_ERROR << op << " called on a thread without an initialised " MLC_CCL_NAME
              << " communicator (call init_ccl first; is this a disco worker?)";
  }
  return ctx;
}

// ------------------------------------------------------------------------------------------
// Tensor helpers
// ------------------------------------------------------------------------------------------

struct Buf {
  uint8_t* data;
  int64_t numel;
  size_t elem;
  DLDataType dtype;
  size_t nbytes() const { return static_cast<size_t>(numel) * elem; }
};

Buf AsBuf(const Tensor& t, const char* op, const char* what) {
  if (!t.defined()) CCL_ERROR << op << ": buffer `" << what << "` must not be None";
  const DLTensor* d = t.GetDLTensorPtr();
  if (d->device.device_type != kDLCPU && d->device.device_type != kDLCUDAHost) {
    CCL_ERROR << op << ": buffer `" << what << "` must be on the CPU, got device type "
              << static_cast<int>(d->device.device_type);
  }
  if (!ffi::IsContiguous(*d)) CCL_ERROR << op << ": buffer `" << what << "` must be contiguous";
  Buf b;
  b.data = static_cast<uint8_t*>(d->data) + d->byte_offset;
  b.numel = 1;
  for (int i = 0; i < d->ndim; ++i) b.numel *= d->shape[i];
  b.elem = (static_cast<size_t>(d->dtype.bits) * d->dtype.lanes + 7) / 8;
  b.dtype = d->dtype;
  return b;
}

inline bool SameDType(DLDataType a, DLDataType b) {
  return a.code == b.code && a.bits == b.bits && a.lanes == b.lanes;
}

// Slice [begin, end) of `count` elements owned by `rank` of `nranks`, cut on 64-byte blocks.
inline void SliceOf(int64_t count, size_t elem, int rank, int nranks, int64_t* begin,
                    int64_t* end) {
  int64_t g = std::max<int64_t>(1, static_cast<int64_t>(kAlign / elem));
  int64_t nblocks = (count + g - 1) / g;
  *begin = std::min(count, nblocks * rank / nranks * g);
  *end = std::min(count, nblocks * (rank + 1) / nranks * g);
}

// ------------------------------------------------------------------------------------------
// Collectives
// ------------------------------------------------------------------------------------------

void AllReduce(Tensor send, int kind_int, bool in_group, Tensor recv) {
  const char* op = "allreduce";
  if (kind_int < 0 || kind_int > 4) CCL_ERROR << "allreduce: unknown ReduceKind " << kind_int;
  ReduceKind kind = static_cast<ReduceKind>(kind_int);
  Context* ctx = Ctx(op);
  Buf in = AsBuf(send, op, "send"), out = AsBuf(recv, op, "recv");
  if (in.numel != out.numel || !SameDType(in.dtype, out.dtype)) {
    CCL_ERROR << "allreduce: send (" << in.numel << " x " << DTypeStr(in.dtype) << ") and recv ("
              << out.numel << " x " << DTypeStr(out.dtype) << ") differ";
  }
  ReduceFn fn = GetReduceFn(in.dtype);
  if (fn == nullptr) CCL_ERROR << "allreduce: unsupported dtype " << DTypeStr(in.dtype);
  ctx->CheckAborted(op);
  Comm& c = ctx->GetComm(in_group);
  if (c.nranks == 1) {
    if (out.data != in.data) std::memcpy(out.data, in.data, in.nbytes());  // any kind: x
    return;
  }
  size_t slot = ctx->slot_bytes();
  int64_t chunk = static_cast<int64_t>(slot / in.elem);
  const uint8_t* srcs[kMaxWorkers];
  for (int64_t off = 0; off < in.numel; off += chunk) {
    int64_t n = std::min(chunk, in.numel - off);
    uint64_t s = c.step++;
    std::memcpy(c.slot(s, c.rank, slot), in.data + off * in.elem, n * in.elem);
    ctx->Barrier(c, op);
    int64_t b, e;
    SliceOf(n, in.elem, c.rank, c.nranks, &b, &e);
    if (e > b) {
      for (int r = 0; r < c.nranks; ++r) srcs[r] = c.slot(s, r, slot) + b * in.elem;
      fn(srcs, c.nranks, c.slot(s, 0, slot) + b * in.elem, e - b, kind);
    }
    ctx->Barrier(c, op);
    std::memcpy(out.data + off * in.elem, c.slot(s, 0, slot), n * in.elem);
  }
}

void AllGather(Tensor send, bool in_group, Tensor recv) {
  const char* op = "allgather";
  Context* ctx = Ctx(op);
  Buf in = AsBuf(send, op, "send"), out = AsBuf(recv, op, "recv");
  Comm& c = ctx->GetComm(in_group);
  if (out.nbytes() != in.nbytes() * c.nranks) {
    CCL_ERROR << "allgather: recv must hold nranks * send.size elements: send has " << in.numel
              << ", recv has " << out.numel << ", nranks = " << c.nranks;
  }
  ctx->CheckAborted(op);
  size_t slot = ctx->slot_bytes();
  size_t total = in.nbytes();
  if (c.nranks == 1) {
    if (out.data != in.data) std::memcpy(out.data, in.data, total);
    return;
  }
  for (size_t off = 0; off < total; off += slot) {
    size_t n = std::min(slot, total - off);
    uint64_t s = c.step++;
    std::memcpy(c.slot(s, c.rank, slot), in.data + off, n);
    ctx->Barrier(c, op);
    for (int r = 0; r < c.nranks; ++r) {
      std::memcpy(out.data + r * total + off, c.slot(s, r, slot), n);
    }
  }
}

void BroadcastFromWorker0(ffi::Optional<Tensor> send, bool in_group, Tensor recv) {
  const char* op = "broadcast_from_worker0";
  Context* ctx = Ctx(op);
  Buf out = AsBuf(recv, op, "recv");
  Comm& c = ctx->GetComm(in_group);
  bool root = c.rank == 0;
  Buf in{};
  if (root) {
    if (!send.has_value()) CCL_ERROR << op << ": worker 0 must provide `send`";
    in = AsBuf(send.value(), op, "send");
    if (in.nbytes() != out.nbytes()) {
      CCL_ERROR << op << ": send has " << in.nbytes() << " bytes but recv has " << out.nbytes();
    }
    if (in.data != out.data) std::memcpy(out.data, in.data, out.nbytes());
  }
  ctx->CheckAborted(op);
  if (c.nranks == 1) return;
  size_t slot = ctx->slot_bytes();
  size_t total = out.nbytes();
  for (size_t off = 0; off < total; off += slot) {
    size_t n = std::min(slot, total - off);
    uint64_t s = c.step++;
    if (root) std::memcpy(c.slot(s, 0, slot), in.data + off, n);
    ctx->Barrier(c, op);
    if (!root) std::memcpy(out.data + off, c.slot(s, 0, slot), n);
  }
}

void ScatterFromWorker0(ffi::Optional<Tensor> send, bool in_group, Tensor recv) {
  const char* op = "scatter_from_worker0";
  Context* ctx = Ctx(op);
  Buf out = AsBuf(recv, op, "recv");
  Comm& c = ctx->GetComm(in_group);
  bool root = c.rank == 0;
  Buf in{};
  size_t shard = out.nbytes();
  if (root) {
    if (!send.has_value()) CCL_ERROR << op << ": worker 0 must provide `send`";
    in = AsBuf(send.value(), op, "send");
    if (in.numel % c.nranks != 0) {
      CCL_ERROR << op << ": send has " << in.numel << " elements, not divisible by "
                << c.nranks << " workers";
    }
    if (in.nbytes() != shard * c.nranks) {
      CCL_ERROR << op << ": recv must hold send.size / nranks elements: send has " << in.numel
                << ", recv has " << out.numel;
    }
  }
  ctx->CheckAborted(op);
  if (c.nranks == 1) {
    if (in.data != out.data) std::memcpy(out.data, in.data, shard);
    return;
  }
  size_t slot = ctx->slot_bytes();
  for (size_t off = 0; off < shard; off += slot) {
    size_t n = std::min(slot, shard - off);
    uint64_t s = c.step++;
    if (root) {
      for (int r = 1; r < c.nranks; ++r) {
        std::memcpy(c.slot(s, r, slot), in.data + r * shard + off, n);
      }
      std::memcpy(out.data + off, in.data + off, n);
    }
    ctx->Barrier(c, op);
    if (!root) std::memcpy(out.data + off, c.slot(s, c.rank, slot), n);
  }
}

void GatherToWorker0(Tensor send, bool in_group, ffi::Optional<Tensor> recv) {
  const char* op = "gather_to_worker0";
  Context* ctx = Ctx(op);
  Buf in = AsBuf(send, op, "send");
  Comm& c = ctx->GetComm(in_group);
  bool root = c.rank == 0;
  Buf out{};
  size_t shard = in.nbytes();
  if (root) {
    if (!recv.has_value()) CCL_ERROR << op << ": worker 0 must provide `recv`";
    out = AsBuf(recv.value(), op, "recv");
    if (out.nbytes() != shard * c.nranks) {
      CCL_ERROR << op << ": recv must hold nranks * send.size elements: send has " << in.numel
                << ", recv has " << out.numel;
    }
  }
  ctx->CheckAborted(op);
  if (c.nranks == 1) {
    if (in.data != out.data) std::memcpy(out.data, in.data, shard);
    return;
  }
  size_t slot = ctx->slot_bytes();
  for (size_t off = 0; off < shard; off += slot) {
    size_t n = std::min(slot, shard - off);
    uint64_t s = c.step++;
    if (!root) std::memcpy(c.slot(s, c.rank, slot), in.data + off, n);
    ctx->Barrier(c, op);
    if (root) {
      std::memcpy(out.data + off, in.data + off, n);
      for (int r = 1; r < c.nranks; ++r) {
        std::memcpy(out.data + r * shard + off, c.slot(s, r, slot), n);
      }
    }
  }
}

void SendToWorker(Tensor buffer, int receiver_id) {
  const char* op = "send_to_worker";
  Context* ctx = Ctx(op);
  if (receiver_id < 0 || receiver_id >= ctx->num_workers() || receiver_id == ctx->worker_id()) {
    CCL_ERROR << op << ": invalid receiver " << receiver_id << " for worker " << ctx->worker_id()
              << " of " << ctx->num_workers();
  }
  Buf b = AsBuf(buffer, op, "buffer");
  ctx->CheckAborted(op);
  ctx->Send(b.data, b.nbytes(), receiver_id, op);
}

void RecvFromWorker(Tensor buffer, int sender_id) {
  const char* op = "recv_from_worker";
  Context* ctx = Ctx(op);
  if (sender_id < 0 || sender_id >= ctx->num_workers() || sender_id == ctx->worker_id()) {
    CCL_ERROR << op << ": invalid sender " << sender_id << " for worker " << ctx->worker_id()
              << " of " << ctx->num_workers();
  }
  Buf b = AsBuf(buffer, op, "buffer");
  ctx->CheckAborted(op);
  ctx->Recv(b.data, b.nbytes(), sender_id, op);
}

// ------------------------------------------------------------------------------------------
// Initialisation
// ------------------------------------------------------------------------------------------

std::mutex g_last_mutex;
std::string g_last_segment;  // name of the segment made by the last init_ccl (for debugging)

std::string UniqueName() {
  static std::atomic<uint64_t> counter{0};
  char buf[96];
  std::snprintf(buf, sizeof(buf), "/mlc_ccl_%d_%llu_%llx", static_cast<int>(getpid()),
                static_cast<unsigned long long>(counter.fetch_add(1)),
                static_cast<unsigned long long>(NowNs() & 0xffffffffffULL));
  return buf;
}

/*! \brief Controller side: make the segment, let every worker map it, unlink its name. */
void InitCCL(Session sess, ffi::Shape device_ids) {
  Config cfg;
  {
    std::lock_guard<std::mutex> lock(g_config_mutex);
    cfg = g_next_config;
  }
  int num_workers = static_cast<int>(sess->GetNumWorkers());
  if (num_workers > kMaxWorkers) {
    CCL_ERROR << "at most " << kMaxWorkers << " workers are supported, got " << num_workers;
  }
  if (!device_ids.empty() && static_cast<int>(device_ids.size()) != num_workers) {
    CCL_ERROR << "init_ccl: got " << device_ids.size() << " device ids for " << num_workers
              << " workers";
  }
  // The session does not expose its number of groups to the controller: ask worker 0.
  int num_groups = 1;
  {
    DRef info = sess->CallPacked(sess->GetGlobalFunc("runtime.disco." MLC_CCL_NAME ".worker_info"));
    ffi::Shape shape = info->DebugGetFromRemote(0).cast<ffi::Shape>();
    TVM_FFI_ICHECK_EQ(shape.size(), 3);
    TVM_FFI_ICHECK_EQ(shape[1], num_workers);
    num_groups = static_cast<int>(shape[2]);
  }
  Layout layout{};
  layout.num_workers = num_workers;
  layout.num_groups = num_groups;
  if (num_workers % layout.num_groups != 0) {
    CCL_ERROR << "init_ccl: " << num_workers << " workers cannot form " << layout.num_groups
              << " groups";
  }
  layout.group_size = num_workers / layout.num_groups;
  layout.slot_bytes = RoundUp(static_cast<size_t>(std::max<int64_t>(cfg.slot_bytes, 4096)), kAlign);
  layout.p2p_bytes = RoundUp(static_cast<size_t>(std::max<int64_t>(cfg.p2p_bytes, 4096)), kAlign);
  size_t total = layout.total_bytes();

  std::string name = UniqueName();
  int fd = shm_open(name.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
  if (fd < 0) CCL_ERROR << "shm_open(" << name << ") failed: " << std::strerror(errno);
  int rc = ftruncate(fd, static_cast<off_t>(total));
  if (rc == 0) rc = posix_fallocate(fd, 0, static_cast<off_t>(total));
  if (rc != 0) {
    int err = rc > 0 ? rc : errno;
    close(fd);
    shm_unlink(name.c_str());
    CCL_ERROR << "cannot reserve " << total << " bytes of shared memory for " << name << ": "
              << std::strerror(err) << " (is /dev/shm big enough? lower slot_bytes)";
  }
  void* p = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (p == MAP_FAILED) {
    shm_unlink(name.c_str());
    CCL_ERROR << "mmap(" << name << ") failed: " << std::strerror(errno);
  }
  auto* hdr = new (p) SegmentHeader();  // the segment is zero-filled; construct the header
  hdr->magic = kMagic;
  hdr->version = kVersion;
  hdr->num_workers = num_workers;
  hdr->num_groups = layout.num_groups;
  hdr->slot_bytes = layout.slot_bytes;
  hdr->p2p_bytes = layout.p2p_bytes;
  hdr->total_bytes = total;
  {
    std::lock_guard<std::mutex> lock(g_last_mutex);
    g_last_segment = name;
  }
  try {
    Session s = sess;
    auto func = s->GetGlobalFunc("runtime.disco." MLC_CCL_NAME ".init_ccl_per_worker");
    s->CallPacked(func, device_ids, ffi::String(name), cfg.timeout_ms, cfg.spin_us);
    for (int i = 0; i < num_workers; ++i) s->SyncWorker(i);
  } catch (...) {
    shm_unlink(name.c_str());
    munmap(p, total);
    throw;
  }
  shm_unlink(name.c_str());  // every worker has it mapped; the name is no longer needed
  uint32_t attached = hdr->attached.load(std::memory_order_acquire);
  munmap(p, total);  // the controller itself never touches the segment again
  if (static_cast<int>(attached) != num_workers) {
    CCL_ERROR << "init_ccl: only " << attached << " of " << num_workers
              << " workers attached to " << name;
  }
}

/*! \brief Worker side. */
void InitCCLPerWorker(ffi::Shape device_ids, ffi::String name, int64_t timeout_ms,
                      int64_t spin_us) {
  DiscoWorker* worker = DiscoWorker::ThreadLocal();
  TVM_FFI_ICHECK(worker != nullptr);
  Config cfg;
  cfg.timeout_ms = timeout_ms;
  cfg.spin_us = spin_us;
  auto ctx = std::make_unique<Context>(std::string(name), worker->worker_id, worker->num_workers,
                                       worker->num_groups, cfg);
  ctx->Attach();
  tls_context = std::move(ctx);  // replaces (and unmaps) a previous communicator, if any
  int device_id = device_ids.empty() ? 0 : static_cast<int>(device_ids[worker->local_worker_id]);
  if (worker->default_device.device_type == kDLCPU) {
    worker->default_device = DLDevice{kDLCPU, device_id};
  }
  worker->ccl = MLC_CCL_NAME;
}

void RecvFromWorker0(Tensor buffer) {
  Context* ctx = Ctx("recv_from_worker0");
  if (ctx->worker_id() == 0) CCL_ERROR << "recv_from_worker0: worker 0 cannot receive from itself";
  ccl::RecvFromWorker(buffer, 0);
}

void SendToNextGroup(Tensor buffer) {
  Context* ctx = Ctx("send_to_next_group");
  int receiver = ctx->worker_id() + ctx->group_size();
  if (receiver >= ctx->num_workers()) {
    CCL_ERROR << "send_to_next_group: worker " << ctx->worker_id() << " is in the last group";
  }
  ccl::SendToWorker(buffer, receiver);
}

void RecvFromPrevGroup(Tensor buffer) {
  Context* ctx = Ctx("recv_from_prev_group");
  int sender = ctx->worker_id() - ctx->group_size();
  if (sender < 0) {
    CCL_ERROR << "recv_from_prev_group: worker " << ctx->worker_id() << " is in the first group";
  }
  ccl::RecvFromWorker(buffer, sender);
}

void SyncWorker() {
  // Every collective above is synchronous on the CPU: nothing is left in flight.
  Ctx("sync_worker");
  std::atomic_thread_fence(std::memory_order_seq_cst);
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
      .def("runtime.disco." MLC_CCL_NAME ".worker_info",
           []() -> ffi::Shape {
             DiscoWorker* w = DiscoWorker::ThreadLocal();
             return ffi::Shape({w->worker_id, w->num_workers, w->num_groups});
           })
      .def("runtime.disco." MLC_CCL_NAME ".configure",
           [](int64_t timeout_ms, int64_t slot_bytes, int64_t p2p_bytes, int64_t spin_us) {
             std::lock_guard<std::mutex> lock(g_config_mutex);
             if (timeout_ms > 0) g_next_config.timeout_ms = timeout_ms;
             if (slot_bytes > 0) g_next_config.slot_bytes = slot_bytes;
             if (p2p_bytes > 0) g_next_config.p2p_bytes = p2p_bytes;
             if (spin_us >= 0) g_next_config.spin_us = spin_us;
           })
      .def("runtime.disco." MLC_CCL_NAME ".last_segment",
           []() -> ffi::String {
             std::lock_guard<std::mutex> lock(g_last_mutex);
             return g_last_segment;
           })
      .def("runtime.disco." MLC_CCL_NAME ".debug_sleep_on_worker",
           [](int64_t worker_id, int64_t ms) {
             if (DiscoWorker::ThreadLocal()->worker_id == worker_id) {
               std::this_thread::sleep_for(std::chrono::milliseconds(ms));
             }
           })
      .def("runtime.disco." MLC_CCL_NAME ".debug_getpid", []() -> int64_t { return getpid(); })
      // Point-to-point test helper: worker `src` sends `buffer` to worker `dst`, which receives
      // it into its own `buffer`; the other workers do nothing.
      .def("runtime.disco." MLC_CCL_NAME ".debug_send_recv",
           [](Tensor buffer, int64_t src, int64_t dst) {
             int me = DiscoWorker::ThreadLocal()->worker_id;
             if (me == src) ccl::SendToWorker(buffer, static_cast<int>(dst));
             if (me == dst) ccl::RecvFromWorker(buffer, static_cast<int>(src));
           })
      // Runs `iters` in-place sum all-reduces of `buffer` back to back inside the worker and
      // returns the mean seconds per all-reduce (no controller round trip is included).
      .def("runtime.disco." MLC_CCL_NAME ".debug_bench_allreduce",
           [](Tensor buffer, int64_t iters) -> double {
             int64_t start = NowNs();
             for (int64_t i = 0; i < iters; ++i) {
               AllReduce(buffer, static_cast<int>(ReduceKind::kSum), false, buffer);
             }
             return (NowNs() - start) * 1e-9 / std::max<int64_t>(iters, 1);
           });
}

}  // namespace ccl
}  // namespace mlc_course
