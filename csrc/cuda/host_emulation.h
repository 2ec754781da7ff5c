// Host emulation of the few CUDA built-ins the p2t kernels use, so that csrc/cuda/p2t_cuda.cu can be
// compiled by a C++ compiler and its kernels run on the CPU (tests/test_gpu_backends.py does this on
// machines without a GPU). Not a CUDA implementation: blocks run one after another, each thread index of
// a block is a std::thread, __shared__ variables are function statics (one block at a time uses them),
// __syncthreads is a barrier over the block and __shfl_xor_sync one over the warp.
#pragma once

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

namespace p2t_emu {

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lk(m_);
    const long gen = gen_;
    if (++count_ == n_) {
      count_ = 0;
      ++gen_;
      cv_.notify_all();
    } else {
      cv_.wait(lk, [&] { return gen_ != gen; });
    }
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  int n_, count_ = 0;
  long gen_ = 0;
};

struct BlockState {
  std::unique_ptr<Barrier> block;
  std::vector<std::unique_ptr<Barrier>> warps;
  std::vector<double> shfl;  // one slot per thread
};

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;
inline thread_local BlockState* block_state = nullptr;

inline void __syncthreads() { block_state->block->wait(); }

inline int atomicMin(int* address, int val) {
  int old = __atomic_load_n(address, __ATOMIC_RELAXED);
  while (val < old && !__atomic_compare_exchange_n(address, &old, val, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}

inline unsigned atomicCAS(unsigned* address, unsigned compare, unsigned val) {
  __atomic_compare_exchange_n(address, &compare, val, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return compare;  // the old value
}

inline unsigned long long atomicCAS(unsigned long long* address, unsigned long long compare, unsigned long long val) {
  __atomic_compare_exchange_n(address, &compare, val, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return compare;
}

// float / double atomicAdd (native on sm_60+) as a compare-and-swap loop on the bits
template <typename T>
inline T atomicAdd(T* address, T val) {
  static_assert(std::is_floating_point<T>::value, "atomicAdd of a float or double");
  using U = typename std::conditional<sizeof(T) == 4, unsigned, unsigned long long>::type;
  U* p = reinterpret_cast<U*>(address);
  U old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
  while (true) {
    T cur;
    std::memcpy(&cur, &old, sizeof(T));
    const T nv = cur + val;
    U nb;
    std::memcpy(&nb, &nv, sizeof(T));
    if (__atomic_compare_exchange_n(p, &old, nb, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) return cur;
  }
}

template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(double), "shuffle of a wider type");
  const int t = threadIdx.x, lane = t % 32, base = t - lane;
  Barrier& w = *block_state->warps[t / 32];
  std::memcpy(&block_state->shfl[t], &v, sizeof(T));
  w.wait();
  T r;
  std::memcpy(&r, &block_state->shfl[base + (lane ^ lane_mask)], sizeof(T));
  w.wait();
  return r;
}

// kernel<<<grid, block>>>(args...): the blocks one after another, the threads of a block concurrently
// (one std::thread per thread index, reused for every block; a barrier closes each block).
template <typename Kernel, typename... Args>
void launch(int64_t grid, int64_t block, Kernel kernel, Args... args) {
  BlockState st;
  st.block = std::make_unique<Barrier>(static_cast<int>(block));
  for (int64_t w = 0; w < (block + 31) / 32; ++w) {
    st.warps.push_back(std::make_unique<Barrier>(static_cast<int>(std::min<int64_t>(32, block - 32 * w))));
  }
  st.shfl.assign(block, 0.0);
  Barrier block_done(static_cast<int>(block));
  std::vector<std::thread> threads;
  threads.reserve(block);
  for (int64_t t = 0; t < block; ++t) {
    threads.emplace_back([&, t] {
      threadIdx.x = static_cast<unsigned>(t);
      blockDim.x = static_cast<unsigned>(block);
      gridDim.x = static_cast<unsigned>(grid);
      block_state = &st;
      for (int64_t b = 0; b < grid; ++b) {
        blockIdx.x = static_cast<unsigned>(b);
        kernel(args...);
        block_done.wait();  // every thread of block b is done before block b + 1 reuses __shared__ data
      }
    });
  }
  for (auto& th : threads) th.join();
}

}  // namespace p2t_emu

using p2t_emu::__shfl_xor_sync;
using p2t_emu::__syncthreads;
using p2t_emu::atomicAdd;
using p2t_emu::atomicCAS;
using p2t_emu::atomicMin;
using p2t_emu::blockDim;
using p2t_emu::blockIdx;
using p2t_emu::threadIdx;
using std::abs;
using std::exp;
using std::max;
using std::min;
using std::sqrt;
