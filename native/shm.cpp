// Shared-memory allreduce among the ranks of one host: class ShmGroup of ringtrain.fusion._native.
//
// Setup is driven from ringtrain/collectives/_shm.py over MPI: local rank 0 creates a
// POSIX shared-memory segment, the others attach to it by name, and as soon as every
// rank has mapped it the name is unlinked. The memory then lives exactly as long as
// some rank maps it, so nothing is left in /dev/shm however the ranks end.
//
// Layout: a header, one padded state per rank (a phase counter that doubles as a
// futex word, the rank's pid and process start time), then 2 x size slots of
// slot_bytes each.
//
// One allreduce streams the tensors through the slots, one chunk at a time. Every rank
// first packs its share of the chunk into its own slot, converting on the way (fp16/bf16
// compression, or float16/bfloat16 widened to float32), then:
//   two-step (reduce-scatter/allgather; two barriers per chunk):
//     barrier; rank r reduces slice r over all slots, in rank order, into its own slot;
//     hierarchical jobs then allreduce slice r with rank r of the other hosts (`cross`,
//     MPI from Python); barrier; every rank copies all slices out into its outputs;
//   one-shot (2 ranks, or steps of up to 64 KiB, on one host; one barrier per chunk):
//     barrier; every rank reduces the whole chunk over all slots, in rank order, straight
//     into its outputs, with the averaging scale and the output conversion fused in.
// One-shot halves the barriers. With 2 ranks it reads no more than two-step does; it
// measured 5-19 % more work per rank (benchmarks/bench_shm.py), but end to end it was about
// even at load 4 and 22 % shorter at load 10, where every barrier risks waiting for a
// descheduled peer (benchmarks/RESULTS.md). With more ranks it reads every slot in full,
// so there it serves only small steps.
// Consecutive chunks alternate between two sets of slots, so a fast rank may pack chunk
// k+1 while a slower one still reads chunk k. `exchange` is one barrier at which every rank
// publishes two numbers: on a single host it carries the cross-rank argument check that
// precedes every collective, so that check needs no MPI call.
//
// Waits spin briefly, then sleep on the futex with a short timeout and check that the
// awaited process is still alive (pid and start time, so a reused pid is not taken for
// it). A dead peer raises PeerLost instead of hanging; so does any rank once another
// has given up (the header's `failed` word).

#include "shm.h"

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "arrays.h"
#include "kernels.h"

#if defined(__linux__)
#include <fcntl.h>
#include <linux/futex.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#define RT_HAVE_SHM 1
#else
#define RT_HAVE_SHM 0
#endif

namespace py = pybind11;

namespace ringtrain {
namespace {

// A peer process died, or another rank gave up, during a shared-memory allreduce.
class PeerLost : public std::runtime_error {
   public:
    using std::runtime_error::runtime_error;
};

// The segment could not be created or attached (no space, no /dev/shm, ...).
class ShmSetupError : public std::runtime_error {
   public:
    using std::runtime_error::runtime_error;
};

std::string errno_text(const std::string& what, int err) { return what + ": " + std::strerror(err); }

#if RT_HAVE_SHM

constexpr uint64_t kMagic = 0x316d6873746e7472ull;  // "rtnshm1", little-endian
constexpr size_t kLine = 128;  // two cache lines, so adjacent-line prefetch does not couple ranks
constexpr size_t kPage = 4096;
constexpr int kMaxRanks = 4096;
constexpr long kSleepNs = 2'000'000;                     // futex timeout: 2 ms
constexpr auto kLivenessEvery = std::chrono::milliseconds(50);  // how often a waiter checks its peer

struct Header {
    uint64_t magic;
    uint64_t size;
    uint64_t slot_bytes;
    uint64_t data_offset;
    alignas(kLine) uint32_t sleepers;  // ranks inside futex_wait; an arrival wakes only if > 0
    uint32_t failed;                   // 0 while healthy, else 1 + the local rank that was lost
};

struct alignas(kLine) RankState {
    uint32_t phase;  // barriers this rank has reached; peers sleep on it
    uint32_t attached;
    int64_t pid;
    uint64_t start_time;  // field 22 of /proc/<pid>/stat
    // The (signature, extra) pair `exchange` published for phase p, in slot p & 1: a rank
    // writes the next one only after every rank passed the phase before, so no peer can
    // still be reading the slot it overwrites.
    int64_t sig[2];
    int64_t extra[2];
};

size_t round_up(size_t n, size_t unit) { return (n + unit - 1) / unit * unit; }

size_t states_offset() { return round_up(sizeof(Header), kLine); }

size_t header_bytes(int size) { return round_up(states_offset() + sizeof(RankState) * size, kPage); }

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
}

// State ('R', 'S', 'Z', ...) and start time of a process, from /proc/<pid>/stat.
bool read_proc_stat(long pid, char* state, uint64_t* start_time) {
    char path[64];
    std::snprintf(path, sizeof path, "/proc/%ld/stat", pid);
    FILE* f = std::fopen(path, "re");
    if (!f) return false;
    char buf[1024];
    const size_t n = std::fread(buf, 1, sizeof buf - 1, f);
    std::fclose(f);
    buf[n] = '\0';
    const char* p = std::strrchr(buf, ')');  // the command name may hold spaces and ')'
    if (!p || p[1] != ' ') return false;
    p += 2;
    *state = *p;
    int field = 3;  // p points at field 3 (state); start time is field 22
    while (field < 22 && *p) {
        if (*p++ == ' ') ++field;
    }
    if (field != 22) return false;
    *start_time = std::strtoull(p, nullptr, 10);
    return true;
}

bool process_alive(long pid, uint64_t start_time) {
    if (pid <= 0) return false;
    if (kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH) return false;
    char state = '?';
    uint64_t now = 0;
    if (!read_proc_stat(pid, &state, &now)) return false;
    return state != 'Z' && state != 'X' && now == start_time;
}

long futex_wait(uint32_t* word, uint32_t expected, long timeout_ns) {
    timespec ts{timeout_ns / 1'000'000'000, timeout_ns % 1'000'000'000};
    return syscall(SYS_futex, word, FUTEX_WAIT, expected, &ts, nullptr, 0);
}

void futex_wake_all(uint32_t* word) { syscall(SYS_futex, word, FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0); }

// ------------------------------------------------------------- reductions
// out = op over ins[0..P) (in rank order), then a post step; out may be one of the ins.

using ReduceFn = void (*)(char* out, const char* const* ins, int P, size_t n, const Params& p);

enum class Post { None, Scale, FloorDiv };

struct Sum {
    template <typename T>
    static T apply(T a, T b) {
        if constexpr (std::is_integral_v<T>) {  // two's-complement wrap-around, as MPI's
            using U = std::make_unsigned_t<T>;
            return static_cast<T>(static_cast<U>(a) + static_cast<U>(b));
        } else {
            return a + b;
        }
    }
};
struct Min {
    template <typename T>
    static T apply(T a, T b) {
        return b < a ? b : a;
    }
};
struct Max {
    template <typename T>
    static T apply(T a, T b) {
        return a < b ? b : a;
    }
};

template <typename T, Post post>
inline T finish(T v, const Params& p) {
    if constexpr (post == Post::Scale) {
        if constexpr (std::is_same_v<T, double>) {
            return v * p.scale64;
        } else {
            return v * p.scale32;
        }
    } else if constexpr (post == Post::FloorDiv) {
        return floor_div<T>(v, static_cast<T>(p.divisor));
    } else {
        return v;
    }
}

constexpr size_t kBlock = 1024;  // elements per block of the P > 2 loop (stays in L1)
constexpr size_t kOneShotBytes = size_t(64) << 10;  // with more than 2 ranks, steps up to this are one-shot

template <typename T, typename Op, Post post>
void reduce_typed(char* out_, const char* const* ins_, int P, size_t n, const Params& p) {
    T* out = reinterpret_cast<T*>(out_);
    const T* a = reinterpret_cast<const T*>(ins_[0]);
    if (P == 2) {
        const T* b = reinterpret_cast<const T*>(ins_[1]);
        for (size_t i = 0; i < n; ++i) {
            out[i] = finish<T, post>(Op::apply(a[i], b[i]), p);
        }
        return;
    }
    T acc[kBlock];
    for (size_t base = 0; base < n; base += kBlock) {
        const size_t m = std::min(kBlock, n - base);
        for (size_t i = 0; i < m; ++i) acc[i] = a[base + i];
        for (int j = 1; j < P; ++j) {
            const T* x = reinterpret_cast<const T*>(ins_[j]) + base;
            for (size_t i = 0; i < m; ++i) acc[i] = Op::apply(acc[i], x[i]);
        }
        for (size_t i = 0; i < m; ++i) out[base + i] = finish<T, post>(acc[i], p);
    }
}

// Compressed buckets: 16-bit floats summed pairwise in rank order, rounded after each add.
template <bool bf16>
void reduce_half_sum(char* out_, const char* const* ins_, int P, size_t n, const Params&) {
    auto add = bf16 ? bf16_add_n : f16_add_n;
    uint16_t* out = reinterpret_cast<uint16_t*>(out_);
    const uint16_t* a = reinterpret_cast<const uint16_t*>(ins_[0]);
    if (P == 2) {
        add(a, reinterpret_cast<const uint16_t*>(ins_[1]), out, n);
        return;
    }
    uint16_t acc[kBlock];
    for (size_t base = 0; base < n; base += kBlock) {
        const size_t m = std::min(kBlock, n - base);
        std::memcpy(acc, a + base, m * sizeof(uint16_t));
        for (int j = 1; j < P; ++j) add(acc, reinterpret_cast<const uint16_t*>(ins_[j]) + base, acc, m);
        std::memcpy(out + base, acc, m * sizeof(uint16_t));
    }
}

template <typename T, Post post>
ReduceFn pick_op(const std::string& op) {
    if (op == "sum") return reduce_typed<T, Sum, post>;
    if constexpr (post == Post::None) {
        if (op == "min") return reduce_typed<T, Min, Post::None>;
        if (op == "max") return reduce_typed<T, Max, Post::None>;
    }
    throw std::invalid_argument("unknown reduction '" + op + "'");
}

template <size_t S>
void k_copy(const char* src, char* dst, size_t count, const Params&) {
    if (src != dst) std::memcpy(dst, src, count * S);
}

template <size_t S>
void k_stream(const char* src, char* dst, size_t count, const Params&) {
    stream_copy(src, dst, count * S);
}


// How one allreduce moves its elements: pack into the slot, reduce, unpack out of it.
struct Plan {
    size_t src_unit = 4, wire_unit = 4, dst_unit = 4;
    Kernel pack = k_copy<4>;
    ReduceFn reduce = nullptr;
    Kernel unpack = k_copy<4>;
    Params pack_p, reduce_p, unpack_p;
    const char* wire_format = "f";  // numpy format of the slots, for `cross`
};

Plan make_plan(const std::string& kind, const std::string& op, const std::string& compress, double scale,
               int64_t divisor, bool hierarchical) {
    if (op != "sum" && op != "min" && op != "max") throw std::invalid_argument("unknown reduction '" + op + "'");
    if (divisor < 1) throw std::invalid_argument("divisor must be >= 1");
    const bool summing = op == "sum";
    Plan plan;
    plan.unpack_p.scale32 = static_cast<float>(scale);
    plan.unpack_p.scale64 = scale;
    plan.unpack_p.divisor = divisor;
    plan.reduce_p = plan.unpack_p;
    if (!compress.empty()) {
        if (kind != "f4" || !summing || (compress != "fp16" && compress != "bf16")) {
            throw std::invalid_argument("compression applies to float32 sums with 'fp16' or 'bf16'");
        }
        const bool bf = compress == "bf16";
        plan.src_unit = 4;
        plan.wire_unit = 2;
        plan.dst_unit = 4;
        plan.pack = bf ? k_f32_to_bf16 : k_f32_to_f16;  // pack_p.scale32 == 1: plain rounding
        plan.reduce = bf ? reduce_half_sum<true> : reduce_half_sum<false>;
        plan.unpack = bf ? k_bf16_to_f32 : k_f16_to_f32;  // widen, then * scale
        plan.wire_format = "H";
        return plan;
    }
    if (kind == "f4" || kind == "f8") {
        const bool f8 = kind == "f8";
        plan.src_unit = plan.wire_unit = plan.dst_unit = f8 ? 8 : 4;
        plan.pack = f8 ? k_copy<8> : k_copy<4>;
        plan.wire_format = f8 ? "d" : "f";
        const bool scaled = summing && scale != 1.0;
        if (scaled && !hierarchical) {  // (x0 + x1 + ...) * scale, in the reduction pass
            plan.reduce = f8 ? pick_op<double, Post::Scale>(op) : pick_op<float, Post::Scale>(op);
            plan.unpack = plan.pack;
        } else {  // scaled, if at all, once the other hosts' sums are in
            plan.reduce = f8 ? pick_op<double, Post::None>(op) : pick_op<float, Post::None>(op);
            plan.unpack = scaled ? (f8 ? k_scale_f64 : k_scale_f32) : plan.pack;
        }
        return plan;
    }
    if (kind == "i4" || kind == "i8") {
        const bool i8 = kind == "i8";
        plan.src_unit = plan.wire_unit = plan.dst_unit = i8 ? 8 : 4;
        plan.pack = i8 ? k_copy<8> : k_copy<4>;
        plan.wire_format = i8 ? "q" : "i";
        const bool divided = summing && divisor > 1;
        if (divided && !hierarchical) {
            plan.reduce = i8 ? pick_op<int64_t, Post::FloorDiv>(op) : pick_op<int32_t, Post::FloorDiv>(op);
            plan.unpack = plan.pack;
        } else {
            plan.reduce = i8 ? pick_op<int64_t, Post::None>(op) : pick_op<int32_t, Post::None>(op);
            plan.unpack = divided ? (i8 ? k_floor_div<int64_t> : k_floor_div<int32_t>) : plan.pack;
        }
        return plan;
    }
    if (kind == "f2" || kind == "bf16") {  // summed in float32, scaled, rounded once back
        const bool bf = kind == "bf16";
        plan.src_unit = 2;
        plan.wire_unit = 4;
        plan.dst_unit = 2;
        plan.pack = bf ? k_bf16_to_f32 : k_f16_to_f32;
        plan.reduce = pick_op<float, Post::None>(op);
        plan.unpack = bf ? k_f32_to_bf16 : k_f32_to_f16;  // * scale unless 1, then round
        if (!summing) plan.unpack_p.scale32 = 1.0f;
        return plan;
    }
    throw std::invalid_argument("shared-memory allreduce cannot reduce elements of kind '" + kind + "'");
}

// One tensor: where it lives and which elements of the stream it holds.
struct Piece {
    char* ptr;
    size_t count;
    size_t start;
};

template <typename F>
void for_pieces(const std::vector<Piece>& pieces, size_t begin, size_t end, F&& f) {
    auto it = std::upper_bound(pieces.begin(), pieces.end(), begin,
                               [](size_t value, const Piece& s) { return value < s.start + s.count; });
    for (; it != pieces.end() && it->start < end; ++it) {
        const size_t lo = std::max(begin, it->start);
        const size_t hi = std::min(end, it->start + it->count);
        if (hi > lo) f(*it, lo - it->start, lo, hi - lo);
    }
}

using Clock = std::chrono::steady_clock;

class ShmGroup {
   public:
    ShmGroup(const std::string& name, bool create, int rank, int size, size_t slot_bytes)
        : name_(name), rank_(rank), size_(size) {
        if (size < 2 || size > kMaxRanks || rank < 0 || rank >= size) {
            throw std::invalid_argument("ShmGroup needs 0 <= rank < size and 2 <= size <= 4096");
        }
        if (slot_bytes < kPage) throw std::invalid_argument("slot_bytes must be at least 4096");
        slot_bytes_ = round_up(slot_bytes, kPage);
        const size_t data_offset = header_bytes(size);
        bytes_ = data_offset + 2 * static_cast<size_t>(size) * slot_bytes_;

        const int fd = shm_open(name.c_str(), create ? (O_CREAT | O_EXCL | O_RDWR) : O_RDWR, 0600);
        if (fd < 0) throw ShmSetupError(errno_text("shm_open(" + name + ")", errno));
        auto fail = [&](const std::string& what, int err) {
            close(fd);
            if (create) shm_unlink(name.c_str());
            throw ShmSetupError(errno_text(what, err));
        };
        if (create) {
            if (ftruncate(fd, static_cast<off_t>(bytes_)) != 0) fail("ftruncate", errno);
            // Reserve the pages now: a full /dev/shm must fail here, not as SIGBUS later.
            const int err = posix_fallocate(fd, 0, static_cast<off_t>(bytes_));
            if (err != 0) fail("posix_fallocate of " + std::to_string(bytes_) + " bytes in /dev/shm", err);
        } else {
            struct stat st {};
            if (fstat(fd, &st) != 0) fail("fstat", errno);
            if (static_cast<size_t>(st.st_size) != bytes_) fail("segment size differs from this rank's", EINVAL);
        }
        void* base = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
        if (base == MAP_FAILED) fail("mmap", errno);
        close(fd);
        base_ = static_cast<char*>(base);
        header_ = reinterpret_cast<Header*>(base_);
        if (create) {
            header_->size = static_cast<uint64_t>(size);
            header_->slot_bytes = slot_bytes_;
            header_->data_offset = data_offset;
            __atomic_store_n(&header_->magic, kMagic, __ATOMIC_RELEASE);
        } else if (__atomic_load_n(&header_->magic, __ATOMIC_ACQUIRE) != kMagic ||
                   header_->size != static_cast<uint64_t>(size) || header_->slot_bytes != slot_bytes_) {
            unmap();
            throw ShmSetupError("segment " + name + " does not match this rank's size or slot size");
        }
        data_ = base_ + data_offset;
        ins_.resize(static_cast<size_t>(size));
        RankState& me = state(rank_);
        char st = '?';
        uint64_t start = 0;
        const long pid = static_cast<long>(getpid());
        read_proc_stat(pid, &st, &start);
        me.pid = pid;
        me.start_time = start;
        __atomic_store_n(&me.attached, 1u, __ATOMIC_RELEASE);
    }

    ~ShmGroup() { unmap(); }

    ShmGroup(const ShmGroup&) = delete;
    ShmGroup& operator=(const ShmGroup&) = delete;

    // Remove the name; the memory stays until the last rank unmaps it.
    void unlink() {
        if (shm_unlink(name_.c_str()) != 0 && errno != ENOENT) {
            throw ShmSetupError(errno_text("shm_unlink(" + name_ + ")", errno));
        }
    }

    // (ok, reason): every peer attached, and its pid is a live process this rank can see
    // with the start time the peer recorded (false when ranks sit in different pid namespaces).
    py::tuple peers_visible() {
        require_open();
        for (int j = 0; j < size_; ++j) {
            const RankState& s = state(j);
            if (__atomic_load_n(&s.attached, __ATOMIC_ACQUIRE) != 1) {
                return py::make_tuple(false, "local rank " + std::to_string(j) + " has not attached");
            }
            if (j != rank_ && !process_alive(s.pid, s.start_time)) {
                return py::make_tuple(false, "local rank " + std::to_string(j) + "'s process (pid " +
                                                 std::to_string(s.pid) + ") is not visible from this rank");
            }
        }
        return py::make_tuple(true, "");
    }

    // Mark the group failed (this rank gives up): every peer's next wait raises PeerLost.
    void abandon() {
        broken_ = true;
        if (header_) {
            uint32_t expected = 0;
            __atomic_compare_exchange_n(&header_->failed, &expected, static_cast<uint32_t>(rank_ + 1), false,
                                        __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
            wake_everyone();
        }
    }

    void allreduce(py::object self, const std::vector<py::array>& srcs, std::vector<py::array>& dsts,
                   const std::string& kind, const std::string& op, const std::string& compress, double scale,
                   int64_t divisor, py::object cross) {
        require_open();
        if (broken_) throw PeerLost("the shared-memory group failed earlier; it cannot be used again");
        const bool hierarchical = !cross.is_none();
        const Plan plan = make_plan(kind, op, compress, scale, divisor, hierarchical);
        if (srcs.size() != dsts.size()) throw std::invalid_argument("srcs and dsts differ in length");
        std::vector<Piece> in, out;
        in.reserve(srcs.size());
        out.reserve(dsts.size());
        size_t total = 0;
        for (size_t i = 0; i < srcs.size(); ++i) {
            const char* s = contiguous_data(srcs[i], "allreduce source");
            char* d = writable_data(dsts[i], "allreduce destination");
            if (static_cast<size_t>(srcs[i].itemsize()) != plan.src_unit ||
                static_cast<size_t>(dsts[i].itemsize()) != plan.dst_unit || srcs[i].size() != dsts[i].size()) {
                throw std::invalid_argument("allreduce source and destination " + std::to_string(i) +
                                            " do not match the element kind or each other's size");
            }
            const size_t count = static_cast<size_t>(srcs[i].size());
            if (count) {
                in.push_back(Piece{const_cast<char*>(s), count, total});
                out.push_back(Piece{d, count, total});
            }
            total += count;
        }
        if (total == 0) return;  // nothing to move
        const size_t capacity = slot_bytes_ / plan.wire_unit;
        Plan run = plan;
        if (total * plan.dst_unit >= kStreamBytes && stream_) {
            if (run.unpack == k_copy<4>) run.unpack = k_stream<4>;
            if (run.unpack == k_copy<8>) run.unpack = k_stream<8>;
        }

        py::gil_scoped_release release;
        try {
            for (size_t start = 0; start < total; start += capacity) {
                const size_t n = std::min(capacity, total - start);
                run_chunk(self, run, in, out, start, n, cross, one_shot(n * plan.wire_unit, hierarchical));
            }
            stream_fence();  // order the non-temporal stores before anything that follows
        } catch (...) {
            abandon();
            throw;
        }
        ++calls_;
    }

    // Every rank publishes (signature, extra) at one barrier; returns the (size, 2) table.
    py::array_t<int64_t> exchange(int64_t sig, int64_t extra) {
        require_open();
        if (broken_) throw PeerLost("the shared-memory group failed earlier; it cannot be used again");
        const uint32_t target = phase_ + 1;
        publish(target, sig, extra);
        {
            py::gil_scoped_release release;
            try {
                barrier();
            } catch (...) {
                abandon();
                throw;
            }
        }
        py::array_t<int64_t> table({static_cast<py::ssize_t>(size_), static_cast<py::ssize_t>(2)});
        auto t = table.mutable_unchecked<2>();
        for (int j = 0; j < size_; ++j) {
            t(j, 0) = state(j).sig[target & 1];
            t(j, 1) = state(j).extra[target & 1];
        }
        return table;
    }

    py::dict stats() const {
        py::dict d;
        d["calls"] = calls_;
        d["chunks"] = chunks_;
        d["pack_s"] = pack_s_;
        d["wait_s"] = wait_s_;
        d["reduce_s"] = reduce_s_;
        d["cross_s"] = cross_s_;
        d["unpack_s"] = unpack_s_;
        return d;
    }

    void reset_stats() {
        calls_ = chunks_ = 0;
        pack_s_ = wait_s_ = reduce_s_ = cross_s_ = unpack_s_ = 0.0;
    }

    void close_group() { unmap(); }

    const std::string& name() const { return name_; }
    int rank() const { return rank_; }
    int size() const { return size_; }
    size_t slot_bytes() const { return slot_bytes_; }
    bool broken() const { return broken_; }
    bool streaming() const { return stream_; }
    void set_streaming(bool on) { stream_ = on; }
    const std::string& algorithm() const { return algorithm_; }
    void set_algorithm(const std::string& a) {
        if (a != "auto" && a != "one_shot" && a != "two_step") {
            throw std::invalid_argument("algorithm must be 'auto', 'one_shot' or 'two_step'");
        }
        algorithm_ = a;
    }
    int spin_us() const { return spin_us_; }
    void set_spin_us(int us) { spin_us_ = std::max(0, us); }

   private:
    RankState& state(int r) const { return reinterpret_cast<RankState*>(base_ + states_offset())[r]; }

    char* slot(size_t buffer, int r) const {
        return data_ + (buffer * static_cast<size_t>(size_) + static_cast<size_t>(r)) * slot_bytes_;
    }

    void require_open() const {
        if (!base_) throw std::runtime_error("the shared-memory group is closed");
    }

    void unmap() {
        if (base_) {
            munmap(base_, bytes_);
            base_ = nullptr;
            header_ = nullptr;
            data_ = nullptr;
        }
    }

    void wake_everyone() {
        for (int j = 0; j < size_; ++j) futex_wake_all(&state(j).phase);
    }

    // Slice r of a chunk of n elements: equal parts, 64-element aligned.
    void slice(int r, size_t n, size_t* lo, size_t* hi) const {
        const size_t q = round_up((n + size_ - 1) / size_, 64);
        *lo = std::min(n, q * static_cast<size_t>(r));
        *hi = std::min(n, *lo + q);
    }

    bool one_shot(size_t chunk_bytes, bool hierarchical) const {
        if (algorithm_ == "one_shot") return true;
        if (algorithm_ == "two_step" || hierarchical) return false;
        return size_ == 2 || chunk_bytes <= kOneShotBytes;
    }

    void publish(uint32_t target, int64_t sig, int64_t extra) {
        RankState& me = state(rank_);
        me.sig[target & 1] = sig;
        me.extra[target & 1] = extra;
    }

    // One chunk: pack, barrier, reduce (and, two-step: cross-host allreduce, barrier, unpack).
    void run_chunk(py::object& self, const Plan& plan, const std::vector<Piece>& in, const std::vector<Piece>& out,
                   size_t start, size_t n, py::object& cross, bool one) {
        const size_t buffer = chunks_ & 1;
        char* mine = slot(buffer, rank_);
        auto t0 = Clock::now();
        for_pieces(in, start, start + n, [&](const Piece& p, size_t off, size_t pos, size_t cnt) {
            plan.pack(p.ptr + off * plan.src_unit, mine + (pos - start) * plan.wire_unit, cnt, plan.pack_p);
        });
        auto t1 = Clock::now();
        barrier();
        auto t2 = Clock::now();
        using S = std::chrono::duration<double>;
        if (one) {
            reduce_into_outputs(plan, out, buffer, start, n);
            auto t3 = Clock::now();
            ++chunks_;
            pack_s_ += S(t1 - t0).count();
            wait_s_ += S(t2 - t1).count();
            reduce_s_ += S(t3 - t2).count();
            return;
        }
        size_t lo, hi;
        slice(rank_, n, &lo, &hi);
        if (hi > lo) {
            for (int j = 0; j < size_; ++j) ins_[j] = slot(buffer, j) + lo * plan.wire_unit;
            plan.reduce(mine + lo * plan.wire_unit, ins_.data(), size_, hi - lo, plan.reduce_p);
        }
        auto t3 = Clock::now();
        if (!cross.is_none() && hi > lo) {
            py::gil_scoped_acquire acquire;
            py::array view(py::dtype(plan.wire_format), {static_cast<py::ssize_t>(hi - lo)},
                           {static_cast<py::ssize_t>(plan.wire_unit)}, mine + lo * plan.wire_unit, self);
            cross(view);
        }
        auto t4 = Clock::now();
        barrier();
        auto t5 = Clock::now();
        for (int k = 0; k < size_; ++k) {
            size_t klo, khi;
            slice(k, n, &klo, &khi);
            const char* from = slot(buffer, k);
            for_pieces(out, start + klo, start + khi, [&](const Piece& p, size_t off, size_t pos, size_t cnt) {
                plan.unpack(from + (pos - start) * plan.wire_unit, p.ptr + off * plan.dst_unit, cnt, plan.unpack_p);
            });
        }
        auto t6 = Clock::now();
        ++chunks_;
        pack_s_ += S(t1 - t0).count();
        wait_s_ += S(t2 - t1).count() + S(t5 - t4).count();
        reduce_s_ += S(t3 - t2).count();
        cross_s_ += S(t4 - t3).count();
        unpack_s_ += S(t6 - t5).count();
    }

    // One-shot: reduce the whole chunk over all slots straight into the outputs. Where the
    // output needs no conversion the reduction writes it directly; otherwise a block at a
    // time goes through a small buffer (in L1) and the output kernel.
    void reduce_into_outputs(const Plan& plan, const std::vector<Piece>& out, size_t buffer, size_t start,
                             size_t n) {
        const bool direct = plan.unpack == k_copy<4> || plan.unpack == k_copy<8>;
        alignas(64) char tmp[kBlock * 8];
        for_pieces(out, start, start + n, [&](const Piece& p, size_t off, size_t pos, size_t cnt) {
            const size_t at = (pos - start) * plan.wire_unit;
            char* dst = p.ptr + off * plan.dst_unit;
            if (direct) {
                for (int j = 0; j < size_; ++j) ins_[j] = slot(buffer, j) + at;
                plan.reduce(dst, ins_.data(), size_, cnt, plan.reduce_p);
                return;
            }
            for (size_t b = 0; b < cnt; b += kBlock) {
                const size_t m = std::min(kBlock, cnt - b);
                for (int j = 0; j < size_; ++j) ins_[j] = slot(buffer, j) + at + b * plan.wire_unit;
                plan.reduce(tmp, ins_.data(), size_, m, plan.reduce_p);
                plan.unpack(tmp, dst + b * plan.dst_unit, m, plan.unpack_p);
            }
        });
    }

    // Arrive at the next phase and wait until every rank has.
    void barrier() {
        const uint32_t target = ++phase_;
        RankState& me = state(rank_);
        __atomic_store_n(&me.phase, target, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&header_->sleepers, __ATOMIC_SEQ_CST) != 0) futex_wake_all(&me.phase);
        for (int j = 0; j < size_; ++j) {
            if (j != rank_) wait_for(j, target);
        }
    }

    // Let Python's signal handlers run (main thread only): Ctrl-C or a handler that raises
    // must end the wait, not be deferred until a peer that may never come arrives.
    static void check_signals() {
        py::gil_scoped_acquire acquire;
        if (PyErr_CheckSignals() != 0) throw py::error_already_set();
    }

    void wait_for(int j, uint32_t target) {
        uint32_t* word = &state(j).phase;
        auto reached = [&](uint32_t v) { return static_cast<int32_t>(v - target) >= 0; };
        // Spin for spin_us_ first: a peer that is running arrives within microseconds,
        // and a futex round trip costs tens of them. A peer that is not running (more
        // ranks than free cores) needs this core, so then sleep.
        if (reached(__atomic_load_n(word, __ATOMIC_ACQUIRE))) return;
        const auto spin_until = Clock::now() + std::chrono::microseconds(spin_us_);
        for (unsigned i = 1;; ++i) {
            if (reached(__atomic_load_n(word, __ATOMIC_ACQUIRE))) return;
            cpu_relax();
            if ((i & 63) == 0 && Clock::now() >= spin_until) break;
        }
        auto next_check = Clock::now() + kLivenessEvery;
        for (;;) {
            __atomic_add_fetch(&header_->sleepers, 1u, __ATOMIC_SEQ_CST);
            const uint32_t v = __atomic_load_n(word, __ATOMIC_SEQ_CST);
            if (!reached(v)) futex_wait(word, v, kSleepNs);
            __atomic_sub_fetch(&header_->sleepers, 1u, __ATOMIC_SEQ_CST);
            if (reached(__atomic_load_n(word, __ATOMIC_ACQUIRE))) return;
            const uint32_t failed = __atomic_load_n(&header_->failed, __ATOMIC_ACQUIRE);
            if (failed != 0) {
                broken_ = true;
                throw PeerLost("local rank " + std::to_string(failed - 1) +
                               " left the shared-memory allreduce (its process died or gave up)");
            }
            const auto now = Clock::now();
            if (now >= next_check) {
                const RankState& s = state(j);
                if (!process_alive(s.pid, s.start_time)) {
                    throw PeerLost("local rank " + std::to_string(j) + " (pid " + std::to_string(s.pid) +
                                   ") died while local rank " + std::to_string(rank_) +
                                   " waited for it in a shared-memory allreduce");
                }
                check_signals();
                next_check = now + kLivenessEvery;
            }
        }
    }

    std::string name_;
    int rank_;
    int size_;
    size_t slot_bytes_ = 0;
    size_t bytes_ = 0;
    char* base_ = nullptr;
    Header* header_ = nullptr;
    char* data_ = nullptr;
    uint32_t phase_ = 0;
    bool broken_ = false;
    int spin_us_ = 50;
    bool stream_ = true;
    std::string algorithm_ = "auto";
    std::vector<const char*> ins_;  // the slots' addresses for one reduction
    uint64_t calls_ = 0, chunks_ = 0;
    double pack_s_ = 0, wait_s_ = 0, reduce_s_ = 0, cross_s_ = 0, unpack_s_ = 0;
};

#endif  // RT_HAVE_SHM

}  // namespace

void register_shm(py::module_& m) {
    py::register_exception<PeerLost>(m, "PeerLost", PyExc_RuntimeError);
    py::register_exception<ShmSetupError>(m, "ShmSetupError", PyExc_OSError);
#if RT_HAVE_SHM
    m.attr("HAVE_SHM") = true;
    py::class_<ShmGroup>(m, "ShmGroup",
                         "Shared-memory allreduce among the ranks of one host (use ringtrain.collectives).")
        .def(py::init<const std::string&, bool, int, int, size_t>(), py::arg("name"), py::arg("create"),
             py::arg("rank"), py::arg("size"), py::arg("slot_bytes"))
        .def("unlink", &ShmGroup::unlink)
        .def("peers_visible", &ShmGroup::peers_visible)
        .def("abandon", &ShmGroup::abandon)
        .def(
            "allreduce",
            [](py::object self, const std::vector<py::array>& srcs, std::vector<py::array> dsts,
               const std::string& kind, const std::string& op, const std::string& compress, double scale,
               int64_t divisor, py::object cross) {
                self.cast<ShmGroup&>().allreduce(self, srcs, dsts, kind, op, compress, scale, divisor, cross);
            },
            py::arg("srcs"), py::arg("dsts"), py::arg("kind"), py::arg("op"), py::arg("compress") = "",
            py::arg("scale") = 1.0, py::arg("divisor") = 1, py::arg("cross") = py::none())
        .def("exchange", &ShmGroup::exchange, py::arg("signature"), py::arg("extra") = 0)
        .def("stats", &ShmGroup::stats)
        .def("reset_stats", &ShmGroup::reset_stats)
        .def("close", &ShmGroup::close_group)
        .def_property_readonly("name", &ShmGroup::name)
        .def_property_readonly("rank", &ShmGroup::rank)
        .def_property_readonly("size", &ShmGroup::size)
        .def_property_readonly("slot_bytes", &ShmGroup::slot_bytes)
        .def_property_readonly("broken", &ShmGroup::broken)
        .def_property("algorithm", &ShmGroup::algorithm, &ShmGroup::set_algorithm)
        .def_property("spin_us", &ShmGroup::spin_us, &ShmGroup::set_spin_us)
        .def_property("streaming", &ShmGroup::streaming, &ShmGroup::set_streaming);
#else
    m.attr("HAVE_SHM") = false;
#endif
}

}  // namespace ringtrain
