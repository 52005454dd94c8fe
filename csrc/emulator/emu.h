// The CUDA execution model on the CPU, for exactly what fgd's kernels use, so that the .cu files
// run unchanged under a host compiler (tests/emu_build.py builds them as torch.ops.fgd_emu.*).
//
// Each block runs on the calling OS thread; its threads are cooperative fibers that switch only at
// __syncthreads and the warp shuffles. It is built to find bugs, not only to run correct code:
//  - between two synchronisation points the live threads of a block run in a seeded random order,
//    and blocks run in a random order, so a missing __syncthreads or an inter-block dependence
//    changes results instead of hiding behind a lucky sequential order;
//  - shared memory is refilled with random bytes before every block (reading it before writing it
//    gives garbage, as on a GPU);
//  - live threads waiting at different barriers, or at a barrier while a shuffle waits for them, or
//    a shuffle whose mask names a lane that has exited, is an error naming the kernel, not a hang
//    (threads that have exited count as arrived, as on the GPU);
//  - a launch a GPU would refuse (block > 1024 threads, grid.y / grid.z > 65535 or above the lowered
//    limit of config(), a zero dimension) is an error naming the kernel.
// Fibers switch only at those points, so a plain `+=` racing between threads is invisible here:
// with FGD_EMU_THREADS each CUDA thread is an OS thread and __syncthreads a std::barrier, for
// ThreadSanitizer (one block at a time; no deadlock detection there).
// Not emulated (compile errors below; `extern __shared__` fails to compile too): dynamic shared
// memory, __syncwarp, the other shuffles and votes, the other atomics, fences, cooperative groups.
// Not modelled at all: devices and streams (everything runs synchronously on the CPU), the memory
// model, performance.
#pragma once

#if defined(__CUDACC__)
#error "emu.h emulates CUDA for a host compiler; under nvcc the kernels are built for the GPU"
#endif

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstdint>
#include <cstring>
#include <exception>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

#if defined(FGD_EMU_THREADS)
#include <barrier>
#include <memory>
#include <thread>
#define FGD_EMU_TLS thread_local
#else
#define FGD_EMU_TLS
#if !defined(__x86_64__) || defined(FGD_EMU_UCONTEXT)
#define FGD_EMU_USE_UCONTEXT
#include <ucontext.h>
#endif
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
// Static storage in one named section: blocks run one at a time, and emu::Block poisons the whole
// section (__start_/__stop_ symbols from the linker) before each one.
#define __shared__ static __attribute__((section("fgd_emu_shared")))

extern "C" {
extern char __start_fgd_emu_shared[] __attribute__((weak, visibility("hidden")));
extern char __stop_fgd_emu_shared[] __attribute__((weak, visibility("hidden")));
}

struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1)
      : x(x_), y(y_), z(z_) {}
};
constexpr int warpSize = 32;

namespace fgd::emu {

// What tests may change (torch.ops.fgd_emu._emu_configure): the seed of the thread and block
// orders, and lowered launch limits so that the kernels' loops over grid-stride are really taken.
struct Config {
  uint64_t seed = 0;
  int64_t max_grid_y = 65535;  // grid.y and grid.z
  int64_t max_blocks = 4096;   // what common.cuh's grid_for may ask for
};
inline Config& config() {
  static Config c;
  return c;
}

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum class State : uint8_t { kReady, kBarrier, kShuffle, kExited };

struct Thread {
  uint3 idx{};
  unsigned int linear = 0;  // x fastest, as on a GPU: lane = linear % 32
  State state = State::kReady;
  void* sp = nullptr;  // saved stack pointer (x86-64 switch)
#if defined(FGD_EMU_USE_UCONTEXT)
  ucontext_t ctx;
#endif
  // The barrier it waits at (__syncthreads' file and line).
  const char* file = nullptr;
  int line = 0;
  // The pending shuffle: this lane's value in, its result out.
  unsigned int mask = 0, delta = 0;
  int width = 32;
  uint64_t in = 0, out = 0;
};

// The running block: the kernel's builtin variables read these.
inline FGD_EMU_TLS Thread* current = nullptr;
inline FGD_EMU_TLS uint3 block_idx{};
inline dim3 grid_dim, block_dim;

}  // namespace fgd::emu

#define threadIdx (::fgd::emu::current->idx)
#define blockIdx (::fgd::emu::block_idx)
#define blockDim (::fgd::emu::block_dim)
#define gridDim (::fgd::emu::grid_dim)

namespace fgd::emu {

inline std::string str(const dim3& d) {
  return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
}

// A launch dimension from an integer (checked before it is narrowed) or a dim3.
inline dim3 dim(const dim3& d) { return d; }
inline dim3 dim(int64_t n) {
  if (n < 0 || n > INT32_MAX) throw Error("fgd emu: launch dimension out of range: " + std::to_string(n));
  return dim3(static_cast<unsigned int>(n));
}

inline void check_launch(const char* kernel, const dim3& grid, const dim3& block) {
  const auto fail = [&](const std::string& why) {
    throw Error(std::string("fgd emu: kernel ") + kernel + ": a GPU would refuse this launch: " +
                why + " (grid " + str(grid) + ", block " + str(block) + ")");
  };
  const int64_t gy = std::min<int64_t>(65535, config().max_grid_y);
  if (!grid.x || !grid.y || !grid.z || !block.x || !block.y || !block.z) fail("a zero dimension");
  if (grid.x > INT32_MAX) fail("grid.x > 2^31 - 1");
  if (grid.y > gy || grid.z > gy) fail("grid.y or grid.z > " + std::to_string(gy));
  if (uint64_t(block.x) * block.y * block.z > 1024) fail("more than 1024 threads per block");
  if (block.z > 64) fail("block.z > 64");
}

// Refill shared memory with random bytes.
inline void poison_shared(std::mt19937_64& rng) {
  if (!__start_fgd_emu_shared) return;
  for (char* p = __start_fgd_emu_shared; p < __stop_fgd_emu_shared; p += sizeof(uint64_t)) {
    const uint64_t r = rng();
    std::memcpy(p, &r, std::min<size_t>(sizeof r, __stop_fgd_emu_shared - p));
  }
}

#if !defined(FGD_EMU_THREADS)
// ---- fibers ----------------------------------------------------------------------------------
// glibc's swapcontext makes a system call per switch; on x86-64 a switch of the callee-saved
// registers alone is far cheaper (benchmarks/RESULTS.md, the emulator). Other targets (or
// FGD_EMU_UCONTEXT) use ucontext.
#if !defined(FGD_EMU_USE_UCONTEXT)
extern "C" void fgd_emu_switch(void** save_sp, void* next_sp);
// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack, stores
// the stack pointer in *save_sp, and resumes the stack next_sp saved the same way.
asm(R"(
  .pushsection .text
  .weak fgd_emu_switch
  .hidden fgd_emu_switch
  .type fgd_emu_switch, @function
fgd_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size fgd_emu_switch, .-fgd_emu_switch
  .popsection
)");
#endif

class Block {
 public:
  static constexpr size_t kStack = 128 * 1024;

  ~Block() {
    if (stacks_) munmap(stacks_, capacity_ * (kStack + page()));
  }

  // Runs every thread of the block at blockIdx `b` through `body` to completion.
  template <typename Body>
  void run(const char* kernel, const Body& body, std::mt19937_64& rng) {
    kernel_ = kernel;
    body_ = &body;
    call_ = [](const void* f) { (*static_cast<const Body*>(f))(); };
    const unsigned int n = block_dim.x * block_dim.y * block_dim.z;
    reserve(n);
    threads_.assign(n, Thread{});
    for (unsigned int i = 0; i < n; ++i) {
      Thread& t = threads_[i];
      t.linear = i;
      t.idx = {i % block_dim.x, (i / block_dim.x) % block_dim.y, i / (block_dim.x * block_dim.y)};
      start(t, stack_top(i));
    }
    std::vector<unsigned int> ready(n);
    for (unsigned int i = 0; i < n; ++i) ready[i] = i;
    for (;;) {
      std::shuffle(ready.begin(), ready.end(), rng);
      for (unsigned int i : ready) resume(threads_[i]);
      if (failure_) {
        const std::exception_ptr e = failure_;
        failure_ = nullptr;
        std::rethrow_exception(e);
      }
      ready.clear();
      release(ready);
      if (ready.empty()) {
        if (std::all_of(threads_.begin(), threads_.end(),
                        [](const Thread& t) { return t.state == State::kExited; }))
          return;
        deadlock();
      }
    }
  }

  // Called on a fiber: park it in `state` and go back to the scheduler.
  void yield(State state) {
    Thread* self = current;
    self->state = state;
    switch_to_scheduler(self);
  }

  static Block& instance() {
    static Block b;
    return b;
  }

 private:
  static size_t page() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }

  void reserve(unsigned int n) {
    if (n <= capacity_) return;
    if (stacks_) munmap(stacks_, capacity_ * (kStack + page()));
    const size_t each = kStack + page();
    void* p = mmap(nullptr, n * each, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw Error("fgd emu: cannot map fiber stacks");
    stacks_ = static_cast<char*>(p);
    capacity_ = n;
    // A guard page below each stack: an overflow faults instead of corrupting its neighbour.
    for (unsigned int i = 0; i < n; ++i) mprotect(stacks_ + i * each, page(), PROT_NONE);
  }
  char* stack_top(unsigned int i) { return stacks_ + (i + 1) * (kStack + page()); }

  static void entry() {
    Block& self = instance();
    Thread* t = current;
    try {
      self.call_(self.body_);
    } catch (...) {
      if (!self.failure_) self.failure_ = std::current_exception();
    }
    t->state = State::kExited;
    self.switch_to_scheduler(t);
    __builtin_unreachable();
  }

#if !defined(FGD_EMU_USE_UCONTEXT)
  void start(Thread& t, char* top) {
    // The frame fgd_emu_switch pops: control words, six registers, then `ret` into entry() with
    // the stack aligned as after a call.
    auto* sp = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(top) & ~uintptr_t(15));
    *--sp = 0;                                      // entry()'s return address: never used
    *--sp = reinterpret_cast<uint64_t>(&Block::entry);
    for (int r = 0; r < 6; ++r) *--sp = 0;          // rbp rbx r12 r13 r14 r15
    uint32_t csr[2];
    asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(csr[0]), "=m"(csr[1]));
    *--sp = uint64_t(csr[0]) | (uint64_t(csr[1] & 0xffff) << 32);
    t.sp = sp;
  }
  void resume(Thread& t) {
    if (t.state != State::kReady) return;
    current = &t;
    fgd_emu_switch(&sched_sp_, t.sp);
    current = nullptr;
  }
  void switch_to_scheduler(Thread* t) { fgd_emu_switch(&t->sp, sched_sp_); }
  void* sched_sp_ = nullptr;
#else
  void start(Thread& t, char* top) {
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = top - kStack;
    t.ctx.uc_stack.ss_size = kStack;
    t.ctx.uc_link = nullptr;
    makecontext(&t.ctx, &Block::entry, 0);
  }
  void resume(Thread& t) {
    if (t.state != State::kReady) return;
    current = &t;
    swapcontext(&sched_ctx_, &t.ctx);
    current = nullptr;
  }
  void switch_to_scheduler(Thread* t) { swapcontext(&t->ctx, &sched_ctx_); }
  ucontext_t sched_ctx_;
#endif

  std::string where() const {
    return std::string("fgd emu: kernel ") + kernel_ + ", block (" + std::to_string(block_idx.x) +
           ", " + std::to_string(block_idx.y) + ", " + std::to_string(block_idx.z) + "): ";
  }

  // Every thread is parked or has exited: complete the warps whose shuffle every named lane has
  // reached, else release the barrier once every live thread waits at it. Errors for a shuffle
  // naming a lane that has exited or does not exist.
  void release(std::vector<unsigned int>& ready) {
    const unsigned int n = threads_.size();
    for (unsigned int w0 = 0; w0 < n; w0 += 32) {
      const unsigned int lanes = std::min(32u, n - w0);
      bool pending = false, complete = true;
      for (unsigned int l = 0; l < lanes; ++l) {
        const Thread& t = threads_[w0 + l];
        if (t.state != State::kShuffle) continue;
        pending = true;
        for (unsigned int m = 0; m < 32; ++m) {
          if (!(t.mask >> m & 1u)) continue;
          if (m >= lanes)
            throw Error(where() + "a shuffle mask names lane " + std::to_string(m) +
                        ", which the block does not have");
          const State s = threads_[w0 + m].state;
          if (s == State::kExited)
            throw Error(where() + "thread " + std::to_string(w0 + l) +
                        " shuffles with a mask naming lane " + std::to_string(m) +
                        ", which has exited");
          if (s != State::kShuffle) complete = false;
        }
      }
      if (!pending || !complete) continue;
      for (unsigned int l = 0; l < lanes; ++l) {
        Thread& t = threads_[w0 + l];
        if (t.state != State::kShuffle) continue;
        const unsigned int seg = l - l % t.width, src = l + t.delta;
        t.out = src < seg + t.width && (t.mask >> src & 1u) ? threads_[w0 + src].in : t.in;
        t.state = State::kReady;
        ready.push_back(w0 + l);
      }
    }
    if (!ready.empty()) return;
    const Thread* first = nullptr;
    for (const Thread& t : threads_) {
      if (t.state == State::kExited) continue;
      if (t.state != State::kBarrier) return;  // deadlock(), by the caller
      if (!first) first = &t;
      if (t.line != first->line || std::strcmp(t.file, first->file) != 0)
        throw Error(where() + "deadlock: threads wait at different __syncthreads (" + site(*first) +
                    " and " + site(t) + "); a barrier must be reached by every live thread of " +
                    "the block");
    }
    if (!first) return;
    for (Thread& t : threads_) {
      if (t.state == State::kBarrier) {
        t.state = State::kReady;
        ready.push_back(t.linear);
      }
    }
  }

  static std::string site(const Thread& t) {
    return std::string(t.file) + ":" + std::to_string(t.line);
  }

  [[noreturn]] void deadlock() {
    unsigned int at_barrier = 0, at_shuffle = 0, exited = 0;
    for (const Thread& t : threads_) {
      at_barrier += t.state == State::kBarrier;
      at_shuffle += t.state == State::kShuffle;
      exited += t.state == State::kExited;
    }
    throw Error(where() + "deadlock: " + std::to_string(at_barrier) + " threads wait at __syncthreads, " +
                std::to_string(at_shuffle) + " at a warp shuffle that cannot complete, " +
                std::to_string(exited) + " have exited (a barrier must be reached by every live " +
                "thread of the block)");
  }

  const char* kernel_ = "";
  const void* body_ = nullptr;
  void (*call_)(const void*) = nullptr;
  std::exception_ptr failure_;
  std::vector<Thread> threads_;
  char* stacks_ = nullptr;
  unsigned int capacity_ = 0;
};

inline void syncthreads(const char* file, int line) {
  current->file = file;
  current->line = line;
  Block::instance().yield(State::kBarrier);
}

inline uint64_t shuffle(unsigned int mask, uint64_t v, unsigned int delta, int width) {
  Thread* t = current;
  t->mask = mask;
  t->delta = delta;
  t->width = width;
  t->in = v;
  Block::instance().yield(State::kShuffle);
  return t->out;
}

template <typename Body>
void run_blocks(const char* kernel, const Body& body, std::mt19937_64& rng) {
  // One launch at a time: the fibers share the scheduler and the shared-memory section.
  static std::mutex one_at_a_time;
  const std::lock_guard<std::mutex> lock(one_at_a_time);
  const uint64_t nb = uint64_t(grid_dim.x) * grid_dim.y * grid_dim.z;
  std::vector<uint64_t> order(nb);
  for (uint64_t i = 0; i < nb; ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), rng);
  for (const uint64_t b : order) {
    block_idx = {unsigned(b % grid_dim.x), unsigned(b / grid_dim.x % grid_dim.y),
                 unsigned(b / (uint64_t(grid_dim.x) * grid_dim.y))};
    poison_shared(rng);
    Block::instance().run(kernel, body, rng);
  }
}

#else  // FGD_EMU_THREADS
// ---- one OS thread per CUDA thread (for ThreadSanitizer) -------------------------------------

struct ThreadBlock {
  std::unique_ptr<std::barrier<>> block;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<uint64_t> slots;
};
inline ThreadBlock* running = nullptr;

inline void syncthreads(const char*, int) { running->block->arrive_and_wait(); }

inline uint64_t shuffle(unsigned int mask, uint64_t v, unsigned int delta, int width) {
  Thread* t = current;
  const unsigned int lane = t->linear % 32, w0 = t->linear - lane;
  auto& warp = *running->warps[t->linear / 32];
  running->slots[t->linear] = v;
  warp.arrive_and_wait();
  const unsigned int seg = lane - lane % width, src = lane + delta;
  const uint64_t out = src < seg + width && (mask >> src & 1u) ? running->slots[w0 + src] : v;
  warp.arrive_and_wait();
  return out;
}

template <typename Body>
void run_blocks(const char* kernel, const Body& body, std::mt19937_64& rng) {
  static std::mutex one_at_a_time;
  const std::lock_guard<std::mutex> lock(one_at_a_time);
  const unsigned int n = block_dim.x * block_dim.y * block_dim.z;
  for (unsigned int bz = 0; bz < grid_dim.z; ++bz)
    for (unsigned int by = 0; by < grid_dim.y; ++by)
      for (unsigned int bx = 0; bx < grid_dim.x; ++bx) {
        poison_shared(rng);
        ThreadBlock tb;
        tb.block = std::make_unique<std::barrier<>>(n);
        for (unsigned int w0 = 0; w0 < n; w0 += 32)
          tb.warps.push_back(std::make_unique<std::barrier<>>(std::min(32u, n - w0)));
        tb.slots.assign(n, 0);
        running = &tb;
        std::vector<Thread> threads(n);
        std::vector<std::thread> os;
        std::exception_ptr failure;
        std::mutex failure_lock;
        for (unsigned int i = 0; i < n; ++i) {
          threads[i].linear = i;
          threads[i].idx = {i % block_dim.x, (i / block_dim.x) % block_dim.y,
                            i / (block_dim.x * block_dim.y)};
          os.emplace_back([&, i, bx, by, bz] {
            current = &threads[i];
            block_idx = {bx, by, bz};
            try {
              body();
            } catch (...) {
              const std::lock_guard<std::mutex> l(failure_lock);
              if (!failure) failure = std::current_exception();
            }
            tb.warps[i / 32]->arrive_and_drop();
            tb.block->arrive_and_drop();
          });
        }
        for (auto& t : os) t.join();
        running = nullptr;
        if (failure) std::rethrow_exception(failure);
      }
  (void)kernel;
}
#endif

// ---- the launch ---------------------------------------------------------------------------------

// Launches so far: with the seed, what the thread and block orders of the next launch derive from.
inline std::atomic<uint64_t> launch_count{0};

// FGD_LAUNCH(grid, block, stream, kernel)(args...) under the emulator (see runtime.h).
template <typename... P>
class Launch {
 public:
  Launch(const char* name, dim3 grid, dim3 block, void (*kernel)(P...))
      : name_(name), grid_(grid), block_(block), kernel_(kernel) {}
  template <typename G, typename B>
  Launch(const char* name, G grid, B block, void (*kernel)(P...))
      : Launch(name, dim(grid), dim(block), kernel) {}

  template <typename... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "fgd emu: wrong number of kernel arguments");
    check_launch(name_, grid_, block_);
    grid_dim = grid_;
    block_dim = block_;
    // The arguments are copied once, as a launch copies them to the device.
    const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    const auto body = [&] { std::apply(kernel_, params); };
    std::mt19937_64 rng(config().seed * 0x9E3779B97F4A7C15ull + launch_count++);
    run_blocks(name_, body, rng);
  }

 private:
  const char* name_;
  dim3 grid_, block_;
  void (*kernel_)(P...);
};
template <typename G, typename B, typename... P>
Launch(const char*, G, B, void (*)(P...)) -> Launch<P...>;

// What FGD_LAUNCH expands to here (runtime.h); emulator-only code calls it directly.
#define FGD_EMU_LAUNCH(grid, block, ...) ::fgd::emu::Launch(#__VA_ARGS__, (grid), (block), __VA_ARGS__)

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "fgd emu: shuffle of a large type");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof v);
  return b;
}
template <typename T>
T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof v);
  return v;
}

// Never defined: using one of these is a compile error naming what the emulator lacks.
template <typename... A>
struct not_emulated : std::false_type {};

}  // namespace fgd::emu

// ---- the device functions -------------------------------------------------------------------------

// A macro, so that the emulator knows which barrier each thread waits at.
#define __syncthreads() ::fgd::emu::syncthreads(__FILE__, __LINE__)

template <typename T>
inline T __shfl_down_sync(unsigned int mask, T var, unsigned int delta, int width = warpSize) {
  if (width <= 0 || width > 32 || (width & (width - 1)))
    throw ::fgd::emu::Error("fgd emu: __shfl_down_sync width must be a power of two <= 32");
  return ::fgd::emu::from_bits<T>(
      ::fgd::emu::shuffle(mask, ::fgd::emu::to_bits(var), delta, width));
}

// Real atomics (std::atomic_ref), so that ThreadSanitizer tells them from plain stores.
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline double atomicAdd(double* p, double v) { return std::atomic_ref<double>(*p).fetch_add(v); }
template <typename T>
inline T fgd_emu_atomic_max(T* p, T v) {
  std::atomic_ref<T> a(*p);
  T old = a.load();
  while (old < v && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}
inline int atomicMax(int* p, int v) { return fgd_emu_atomic_max(p, v); }
inline unsigned long long atomicMax(unsigned long long* p, unsigned long long v) {
  return fgd_emu_atomic_max(p, v);
}

inline int __float_as_int(float v) { return std::bit_cast<int>(v); }
inline float __int_as_float(int v) { return std::bit_cast<float>(v); }
inline long long __double_as_longlong(double v) { return std::bit_cast<long long>(v); }
inline double __longlong_as_double(long long v) { return std::bit_cast<double>(v); }

#define FGD_EMU_NOT_EMULATED(name)                                                              \
  template <typename... A>                                                                      \
  void name(A...) {                                                                             \
    static_assert(::fgd::emu::not_emulated<A...>::value,                                        \
                  "fgd emu: " #name " is not emulated (csrc/emulator/emu.h lists what is)");     \
  }
FGD_EMU_NOT_EMULATED(__syncwarp)
FGD_EMU_NOT_EMULATED(__syncthreads_count)
FGD_EMU_NOT_EMULATED(__syncthreads_and)
FGD_EMU_NOT_EMULATED(__syncthreads_or)
FGD_EMU_NOT_EMULATED(__shfl_sync)
FGD_EMU_NOT_EMULATED(__shfl_up_sync)
FGD_EMU_NOT_EMULATED(__shfl_xor_sync)
FGD_EMU_NOT_EMULATED(__ballot_sync)
FGD_EMU_NOT_EMULATED(__all_sync)
FGD_EMU_NOT_EMULATED(__any_sync)
FGD_EMU_NOT_EMULATED(__activemask)
FGD_EMU_NOT_EMULATED(__threadfence)
FGD_EMU_NOT_EMULATED(__threadfence_block)
FGD_EMU_NOT_EMULATED(atomicCAS)
FGD_EMU_NOT_EMULATED(atomicExch)
FGD_EMU_NOT_EMULATED(atomicSub)
FGD_EMU_NOT_EMULATED(atomicMin)
FGD_EMU_NOT_EMULATED(atomicInc)
FGD_EMU_NOT_EMULATED(atomicAnd)
FGD_EMU_NOT_EMULATED(atomicOr)
FGD_EMU_NOT_EMULATED(__ldg)
#undef FGD_EMU_NOT_EMULATED
