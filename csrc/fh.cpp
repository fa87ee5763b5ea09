// Felzenszwalb–Huttenlocher segmentation; see fh.hpp for what each step reproduces.
#include "fh.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <utility>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#ifdef FH_PROFILE  // -DFH_PROFILE prints the time of each step to stderr
#include <chrono>
#include <cstdio>
#define PROF_START auto prof_t = std::chrono::steady_clock::now();
#define PROF(name)                                                                                   \
    {                                                                                                \
        auto now = std::chrono::steady_clock::now();                                                 \
        std::fprintf(stderr, "%s %.2f ms\n", name, std::chrono::duration<double, std::milli>(now - prof_t).count()); \
        prof_t = now;                                                                                \
    }
#else
#define PROF_START
#define PROF(name)
#endif

namespace fh {
namespace {

// scipy.ndimage 'reflect' (half-sample symmetric) index, valid for any offset, also when the
// line is shorter than the kernel radius: period 2n, d c b a | a b c d | d c b a.
inline int64_t reflect_index(int64_t i, int64_t n) {
    const int64_t period = 2 * n;
    int64_t m = i % period;
    if (m < 0) m += period;
    return m < n ? m : period - 1 - m;
}

// numpy's pairwise summation (as np.add.reduce runs it over one contiguous axis).
double numpy_pairwise_sum(const double* a, int64_t n) {
    if (n < 8) {
        double res = 0.0;
        for (int64_t i = 0; i < n; ++i) res += a[i];
        return res;
    }
    if (n <= 128) {
        double r[8];
        for (int j = 0; j < 8; ++j) r[j] = a[j];
        int64_t i = 8;
        for (; i < n - (n % 8); i += 8)
            for (int j = 0; j < 8; ++j) r[j] += a[i + j];
        double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; ++i) res += a[i];
        return res;
    }
    int64_t n2 = n / 2;
    n2 -= n2 % 8;
    return numpy_pairwise_sum(a, n2) + numpy_pairwise_sum(a + n2, n - n2);
}

// A union-find node: parent link (self for a root) and, for a root, its merge threshold.
struct Node {
    int32_t parent;
    float threshold;
};

// Allocator of the large scratch buffers: 2 MB aligned and, on Linux, advised as transparent huge
// pages, so that the union-find's random accesses and the bucket scatter do not keep missing the
// TLB (measured 2-4% faster on 640x480 images). Buffers under 2 MB come from operator new.
template <typename T>
struct HugePageAllocator {
    using value_type = T;
    static constexpr size_t kHugePage = size_t(2) << 20;

    HugePageAllocator() = default;
    template <typename U>
    HugePageAllocator(const HugePageAllocator<U>&) {}

    T* allocate(size_t n) {
        const size_t bytes = n * sizeof(T);
        if (bytes < kHugePage) return static_cast<T*>(::operator new(bytes));
        const size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
        void* memory = std::aligned_alloc(kHugePage, rounded);
        if (memory == nullptr) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
        madvise(memory, rounded, MADV_HUGEPAGE);  // advice only: failure changes nothing
#endif
        return static_cast<T*>(memory);
    }
    // Elements are default-initialised (no zeroing): grow() hands out its buffers with unspecified contents, and
    // a large image's fresh buffers would otherwise be written once more before their first real use.
    template <typename U>
    void construct(U* p) noexcept {
        ::new (static_cast<void*>(p)) U;
    }
    template <typename U, typename... Args>
    void construct(U* p, Args&&... args) {
        ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
    }
    void deallocate(T* memory, size_t n) {
        if (n * sizeof(T) < kHugePage) {
            ::operator delete(memory);
        } else {
            std::free(memory);
        }
    }
    template <typename U>
    bool operator==(const HugePageAllocator<U>&) const { return true; }
    template <typename U>
    bool operator!=(const HugePageAllocator<U>&) const { return false; }
};

template <typename T>
using Buffer = std::vector<T, HugePageAllocator<T>>;

// Scratch buffers reused across calls on one thread: fresh multi-megabyte allocations would cost
// more in page faults than the segmentation itself.
struct Workspace {
    Buffer<double> image, smoothed, padded, squares, cost;
    Buffer<uint32_t> key;
    std::vector<uint32_t> bucket_start;
    Buffer<SortedEdge> sorted, scratch;
    struct ScaleBuffers {
        Buffer<Node> nodes;
        Buffer<int32_t> size;
        Buffer<uint32_t> rejected;
    };
    std::vector<ScaleBuffers> forests;  // one per scale
    Buffer<uint32_t> last_merge;   // shared prefix: the edge that last grew each segment
};

Workspace& workspace() {
    thread_local Workspace ws;
    return ws;
}

template <typename T>
size_t capacity_bytes(const Buffer<T>& buffer) {
    return buffer.capacity() * sizeof(T);
}

// Scratch kept between calls is bounded: about 250 bytes a pixel for three scales, so a COCO-sized
// image stays cached and a huge one (a 12-megapixel photo needs 3 GB) is handed back to the allocator.
constexpr size_t kMaxRetainedScratch = size_t(192) << 20;

void release_large_workspace() {
    Workspace& ws = workspace();
    size_t bytes = capacity_bytes(ws.image) + capacity_bytes(ws.smoothed) + capacity_bytes(ws.padded) +
                   capacity_bytes(ws.squares) + capacity_bytes(ws.cost) +
                   capacity_bytes(ws.key) + capacity_bytes(ws.sorted) + capacity_bytes(ws.scratch) +
                   capacity_bytes(ws.last_merge);
    for (const Workspace::ScaleBuffers& scale : ws.forests)
        bytes += capacity_bytes(scale.nodes) + capacity_bytes(scale.size) + capacity_bytes(scale.rejected);
    if (bytes > kMaxRetainedScratch) ws = Workspace();
}

// Hands a buffer's memory back at once.
template <typename T>
void release(Buffer<T>& buffer) {
    Buffer<T>().swap(buffer);
}

// The first n elements of a reused buffer (contents unspecified).
template <typename T>
T* grow(Buffer<T>& buffer, int64_t n) {
    if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
    return buffer.data();
}

// Row kernels, compiled for several instruction sets. Element-wise IEEE add, multiply, sqrt and
// float32 rounding (no FMA: -ffp-contract=off) give the same bits on every one of them.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FH_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FH_MULTIVERSION
#endif

FH_MULTIVERSION void scale_row(double* __restrict out, const double* __restrict in, double w, int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] = in[i] * w;
}

FH_MULTIVERSION void add_pair_row(double* __restrict out, const double* __restrict a,
                                  const double* __restrict b, double w, int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] += (a[i] + b[i]) * w;
}

// squares[i] (+)= (q[i] - p[i])^2; the first channel assigns, so the sum starts as numpy's does.
FH_MULTIVERSION void add_square_diff_row(double* __restrict squares, const double* __restrict p,
                                         const double* __restrict q, bool first, int64_t n) {
    if (first) {
        for (int64_t i = 0; i < n; ++i) squares[i] = (q[i] - p[i]) * (q[i] - p[i]);
    } else {
        for (int64_t i = 0; i < n; ++i) squares[i] += (q[i] - p[i]) * (q[i] - p[i]);
    }
}

// cost = sqrt(sum of squares), key = its float32 bit pattern; every NaN (from inputs that overflow
// in the smoothing) gets the largest key, whatever its sign bit, so NaNs sort last in edge order, as
// numpy's stable argsort puts them.
const double kNaNLast = [] {
    const uint64_t all_ones = ~uint64_t(0);
    double nan;
    std::memcpy(&nan, &all_ones, sizeof nan);
    return nan;
}();

FH_MULTIVERSION void finish_cost_row(const double* __restrict squares, double* __restrict cost,
                                     uint32_t* __restrict key, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        const double c = std::sqrt(squares[i]);
        cost[i] = c;
        const float f = static_cast<float>(c == c ? c : kNaNLast);  // float(kNaNLast) has bits 0xFFFFFFFF
        std::memcpy(key + i, &f, sizeof f);
    }
}

// The two pixels of the edge with code type << 30 | p: p and p + offset[type].
struct EdgeEnds {
    int32_t a, b;
};
inline EdgeEnds edge_ends(uint32_t code, const int64_t* offset) {
    const int32_t a = static_cast<int32_t>(code & kPixelMask);
    return {a, static_cast<int32_t>(a + offset[code >> 30])};
}

}  // namespace

namespace {

// Channels-last src [H, W, C] -> planes in the thread's scratch, value(src element) per element.
template <typename T, typename Convert>
FloatImage to_planes(const T* src, int64_t height, int64_t width, int64_t channels, Convert value) {
    FloatImage image{height, width, channels, nullptr};
    const int64_t n = height * width;
    double* planes = image.data = grow(workspace().image, image.size());
    if (channels == 3) {  // the usual case, unrolled
        for (int64_t p = 0; p < n; ++p) {
            planes[p] = value(src[3 * p]);
            planes[n + p] = value(src[3 * p + 1]);
            planes[2 * n + p] = value(src[3 * p + 2]);
        }
    } else {
        for (int64_t p = 0; p < n; ++p)
            for (int64_t c = 0; c < channels; ++c) planes[c * n + p] = value(src[p * channels + c]);
    }
    return image;
}

}  // namespace

FloatImage from_uint8(const uint8_t* src, int64_t height, int64_t width, int64_t channels) {
    const double inv = 1.0 / 255.0;  // skimage multiplies by the reciprocal
    double lut[256];
    for (int v = 0; v < 256; ++v) lut[v] = static_cast<double>(v) * inv;
    return to_planes(src, height, width, channels, [&](uint8_t v) { return lut[v]; });
}

FloatImage from_float64(const double* src, int64_t height, int64_t width, int64_t channels) {
    return to_planes(src, height, width, channels, [](double v) { return v; });
}

namespace {

// Images narrower than this are smoothed a whole channel plane at a time: row by row, a row of a few pixels
// would cost one call per row and tap (a 5,000,000 x 1 image with sigma 30: 20 s, scikit-image 12.6 s).
constexpr int64_t kNarrowWidth = 16;

// gaussian_smooth for narrow images, with the same operations on every value in the same order. Axis 0: the
// plane times w0, then for k = r..1 one call over the rows whose neighbours k rows away need no reflection (a
// contiguous range of the plane) and one per remaining row; axis 1: per tap k, every pixel through tables of
// its reflected neighbours x - k and x + k.
void gaussian_smooth_narrow(FloatImage& image, const std::vector<double>& weights, double* smoothed) {
    const int64_t radius = static_cast<int64_t>(weights.size() / 2);
    const double w0 = weights[radius];
    const int64_t H = image.height, W = image.width, n = H * W;
    Workspace& ws = workspace();
    double* axis0 = grow(ws.padded, n);
    std::vector<int64_t> left(radius * W), right(radius * W);  // [k - 1][x]: reflect(x - k), reflect(x + k)
    for (int64_t k = 1; k <= radius; ++k)
        for (int64_t x = 0; x < W; ++x) {
            left[(k - 1) * W + x] = reflect_index(x - k, W);
            right[(k - 1) * W + x] = reflect_index(x + k, W);
        }
    for (int64_t c = 0; c < image.channels; ++c) {
        const double* in = image.data + c * n;
        scale_row(axis0, in, w0, n);
        for (int64_t k = radius; k >= 1; --k) {
            const double w = weights[radius - k];
            const int64_t first = std::min(k, H), last = std::max(first, H - k);  // rows [first, last): no reflection
            if (last > first) add_pair_row(axis0 + first * W, in + (first - k) * W, in + (first + k) * W, w,
                                           (last - first) * W);
            for (int64_t y = 0; y < H; ++y) {
                if (y == first) y = last;
                if (y >= H) break;
                add_pair_row(axis0 + y * W, in + reflect_index(y - k, H) * W, in + reflect_index(y + k, H) * W, w,
                             W);
            }
        }
        double* out = smoothed + c * n;
        scale_row(out, axis0, w0, n);
        for (int64_t k = radius; k >= 1; --k) {
            const double w = weights[radius - k];
            const int64_t* l = left.data() + (k - 1) * W;
            const int64_t* r = right.data() + (k - 1) * W;
            for (int64_t row = 0; row < n; row += W)
                for (int64_t x = 0; x < W; ++x) out[row + x] += (axis0[row + l[x]] + axis0[row + r[x]]) * w;
        }
    }
    image.data = smoothed;
}

}  // namespace

void gaussian_smooth(FloatImage& image, const std::vector<double>& weights) {
    if (weights.empty()) return;
    const int64_t radius = static_cast<int64_t>(weights.size() / 2);
    const double w0 = weights[radius];
    const int64_t H = image.height, W = image.width, n = H * W;
    Workspace& ws = workspace();
    double* smoothed = grow(ws.smoothed, image.size());
    if (W < kNarrowWidth) return gaussian_smooth_narrow(image, weights, smoothed);
    double* padded = grow(ws.padded, W + 2 * radius);
    double* centre = padded + radius;
    // Row by row, both axes while the row is in cache. Each value is summed as scipy's
    // NI_Correlate1D sums it (axis 0 over the whole image, then axis 1 over its result): centre *
    // w0, then (x[-k] + x[+k]) * w_k for k = r..1; axis 1 reads the row padded by reflection.
    for (int64_t c = 0; c < image.channels; ++c) {
        const double* in = image.data + c * n;
        for (int64_t y = 0; y < H; ++y) {
            scale_row(centre, in + y * W, w0, W);
            for (int64_t k = radius; k >= 1; --k)
                add_pair_row(centre, in + reflect_index(y - k, H) * W, in + reflect_index(y + k, H) * W,
                             weights[radius - k], W);
            for (int64_t j = 0; j < radius; ++j) {
                padded[j] = centre[reflect_index(j - radius, W)];
                centre[W + j] = centre[reflect_index(W + j, W)];
            }
            double* out = smoothed + c * n + y * W;
            scale_row(out, centre, w0, W);
            for (int64_t k = radius; k >= 1; --k)
                add_pair_row(out, centre - k, centre + k, weights[radius - k], W);
        }
    }
    image.data = smoothed;
}

// Stable insertion sort on the exact cost (strict >: equal costs keep their order). Linear on
// nearly sorted input.
void insertion_sort_by_cost(SortedEdge* first, int64_t n) {
    for (int64_t i = 1; i < n; ++i) {
        if (!(first[i - 1].cost > first[i].cost)) continue;
        const SortedEdge item = first[i];
        int64_t hole = i;
        while (hole > 0 && first[hole - 1].cost > item.cost) {
            first[hole] = first[hole - 1];
            --hole;
        }
        first[hole] = item;
    }
}

// Kept out of the hot scan below (inlined, the rare path slowed the scan measurably).
#if defined(__GNUC__)
#define FH_COLD __attribute__((noinline, cold))
#else
#define FH_COLD
#endif

// Orders the run of equal keys that holds the inversion at items i - 1, i (everything before i is
// in order); returns the run's end. Insertion sort from i, as long as its moves stay linear in the
// run's length; past that budget (a long run far from cost order), a merge sort of the whole run
// (the insertions made so far kept equal costs in edge order, so it is still stable).
FH_COLD int64_t order_run_by_cost(SortedEdge* first, int64_t n, int64_t i) {
    const uint32_t key = first[i].key;
    int64_t budget = 64;
    int64_t end = i;
    for (; end < n && first[end].key == key; ++end) {
        budget += 8;
        if (!(first[end - 1].cost > first[end].cost)) continue;
        const SortedEdge item = first[end];
        int64_t hole = end;
        while (hole > 0 && first[hole - 1].cost > item.cost) {  // stops at the run's start: smaller key
            first[hole] = first[hole - 1];
            --hole;
        }
        first[hole] = item;
        budget -= end - hole;
        if (budget < 0) {
            int64_t begin = hole;
            while (begin > 0 && first[begin - 1].key == key) --begin;
            while (end < n && first[end].key == key) ++end;
            std::stable_sort(first + begin, first + end,
                             [](const SortedEdge& a, const SortedEdge& b) { return a.cost < b.cost; });
            return end;
        }
    }
    return end;
}

// Orders a range sorted by key by the exact cost, stably. Distinct costs can share a float32 key
// (and every cost does when the costs lie outside float32's range: images scaled by 1e40 or 1e-50
// round every key to inf or 0, float32 subnormals near 1e-40 keep few bits), so only runs of equal
// keys can be out of order. One scan finds each inversion (as rare on photos as the shared keys);
// the run of equal keys around it is then sorted, by insertion while that stays linear and by a
// merge sort past it, so no input is quadratic. A run's costs are all NaN or none is, so `<` orders
// it strictly weakly (NaNs compare false: no inversion, they stay in edge order).
void order_equal_keys_by_cost(SortedEdge* first, int64_t n) {
    for (int64_t i = 1; i < n; ++i) {
        if (!(first[i - 1].cost > first[i].cost)) continue;  // in order: the usual case
        // An inversion: items i - 1 and i share a key (distinct keys order their costs). Items
        // end - 1 and end have distinct keys, so the scan resumes at end + 1.
        i = order_run_by_cost(first, n, i);
    }
}

// Stable sort of one bucket: LSD radix on the low `bits` bits of the float32 key, then exact costs.
void sort_bucket(SortedEdge* first, int64_t n, int bits, SortedEdge* scratch) {
    if (n < 2) return;
    if (n <= 48) {  // insertion sort on the exact cost; strict > keeps equal costs in edge order
        insertion_sort_by_cost(first, n);
        return;
    }
    constexpr int kBits = 9, kRadix = 1 << kBits;
    SortedEdge* src = first;
    SortedEdge* dst = scratch;
    for (int shift = 0; shift < bits; shift += kBits) {
        uint32_t offset[kRadix] = {};
        for (int64_t i = 0; i < n; ++i) ++offset[(src[i].key >> shift) & (kRadix - 1)];
        uint32_t sum = 0;
        bool shared = false;
        for (int b = 0; b < kRadix; ++b) {
            shared |= offset[b] == n;
            const uint32_t count = offset[b];
            offset[b] = sum;
            sum += count;
        }
        if (shared) continue;  // every key has this digit
        for (int64_t i = 0; i < n; ++i) dst[offset[(src[i].key >> shift) & (kRadix - 1)]++] = src[i];
        std::swap(src, dst);
    }
    if (src != first) std::copy(src, src + n, first);
    // Sorted by key; runs of equal keys are ordered by the exact cost while the bucket is in cache.
    order_equal_keys_by_cost(first, n);
}

namespace {

constexpr int kTopShift = 18;                         // the sort's first pass: buckets of the key's top bits
constexpr int kTopBuckets = 1 << (32 - kTopShift);

// Calls code(type << 30 | p) for every edge in edge order (right edges, then down, down-right and up-right ones,
// raster order within a type: ascending code, scikit-image's order), p the edge's first pixel.
template <typename F>
inline void for_each_edge_code(int64_t H, int64_t W, F&& code) {
    auto run = [&](uint32_t type, int64_t p0, int64_t n) {
        for (int64_t j = 0; j < n; ++j) code((type << 30) | uint32_t(p0 + j));
    };
    for (int64_t y = 0; y < H; ++y) run(0, y * W, W - 1);
    for (int64_t y = 0; y + 1 < H; ++y) run(1, y * W, W);
    for (int64_t y = 0; y + 1 < H; ++y) run(2, y * W, W - 1);
    for (int64_t y = 0; y + 1 < H; ++y) run(3, y * W + 1, W - 1);
}

// The costs of all edges in edge order, with their float32 keys (monotone in the cost), in the thread's
// scratch (ws.cost, ws.key); when `histogram` is given (kTopBuckets + 1 zeros), the keys' top bits are counted
// into histogram[bucket + 1] on the way.
EdgeCosts compute_edge_costs(const FloatImage& image, uint32_t* histogram) {
    const int64_t H = image.height, W = image.width, C = image.channels, HW = H * W;
    Workspace& ws = workspace();
    // Row by row (each image row is read once for the four edge types), vectorised over x on the channel
    // planes, written in edge order.
    const double* planes = image.data;
    const int64_t n_right = H * (W - 1), n_down = (H - 1) * W, n_diagonal = (H - 1) * (W - 1);
    const int64_t n_edges = n_right + n_down + 2 * n_diagonal;
    const int64_t first_of_type[4] = {0, n_right, n_right + n_down, n_right + n_down + n_diagonal};
    double* squares = grow(ws.squares, std::max<int64_t>(W, 1));
    double* cost = grow(ws.cost, n_edges);
    uint32_t* key = grow(ws.key, n_edges);
    std::vector<double> diff(C);
    // One run of n edges whose first pixels are p0..p0+n-1 and second pixels q0..q0+n-1, stored
    // from edge index e.
    auto add_run = [&](int64_t p0, int64_t q0, int64_t n, int64_t e) {
        if (n <= 0) return;
        if (C < 8) {
            for (int64_t c = 0; c < C; ++c)
                add_square_diff_row(squares, planes + c * HW + p0, planes + c * HW + q0, c == 0, n);
        } else {  // numpy sums 8 or more channels pairwise
            for (int64_t i = 0; i < n; ++i) {
                for (int64_t c = 0; c < C; ++c) {
                    const double d = planes[c * HW + q0 + i] - planes[c * HW + p0 + i];
                    diff[c] = d * d;
                }
                squares[i] = numpy_pairwise_sum(diff.data(), C);
            }
        }
        finish_cost_row(squares, cost + e, key + e, n);
        if (histogram != nullptr)
            for (int64_t i = 0; i < n; ++i) ++histogram[(key[e + i] >> kTopShift) + 1];
    };
    for (int64_t y = 0; y < H; ++y) {
        add_run(y * W, y * W + 1, W - 1, first_of_type[0] + y * (W - 1));
        if (y + 1 == H) break;
        add_run(y * W, y * W + W, W, first_of_type[1] + y * W);
        add_run(y * W, y * W + W + 1, W - 1, first_of_type[2] + y * (W - 1));
        add_run(y * W + 1, y * W + W, W - 1, first_of_type[3] + y * (W - 1));
    }
    return EdgeCosts{cost, key, n_edges};
}

}  // namespace

EdgeCosts edge_costs(const FloatImage& image) { return compute_edge_costs(image, nullptr); }

void edge_codes(int64_t height, int64_t width, uint32_t* codes) {
    for_each_edge_code(height, width, [&](uint32_t code) { *codes++ = code; });
}

SortedEdges sorted_edges(const FloatImage& image) {
    const int64_t H = image.height, W = image.width;
    Workspace& ws = workspace();
    PROF_START

    // 1. The costs in edge order, with a histogram of the keys' top bits (the buckets of step 2).
    std::vector<uint32_t>& start = ws.bucket_start;
    start.assign(kTopBuckets + 1, 0);
    const EdgeCosts costs = compute_edge_costs(image, start.data());
    const double* cost = costs.cost;
    const uint32_t* key = costs.key;
    const int64_t n_edges = costs.count;
    PROF("costs")
    // An image whose edge buffers alone pass the retained bound has all its scratch handed back when it is
    // done (release_large_workspace): there each buffer goes as soon as it is dead, which lowers the peak
    // (a 12-megapixel image, three scales: 3.1 -> 2.0 GB peak) and costs nothing more.
    const bool release_early = n_edges * int64_t(sizeof(SortedEdge) + sizeof(double) + sizeof(uint32_t)) >
                               static_cast<int64_t>(kMaxRetainedScratch);
    if (release_early) {  // the pixels: only the costs are needed from here
        release(ws.image);
        release(ws.smoothed);
    }

    // 2. Stable scatter on the key's top 14 bits (sign, exponent, five mantissa bits: 32 buckets
    //    per octave), reading in edge order so codes ascend within a bucket; then each bucket is
    //    sorted on its low 18 bits (two 9-bit radix passes) while it sits in cache. These widths
    //    were the fastest of 12-16 top bits and 8-10 bit digits on 640x480 photos.
    for (int b = 0; b < kTopBuckets; ++b) start[b + 1] += start[b];
    SortedEdge* sorted = grow(ws.sorted, n_edges);
    {
        std::vector<uint32_t> fill(start.begin(), start.end() - 1);
        int64_t i = 0;
        for_each_edge_code(H, W, [&](uint32_t code) {
            sorted[fill[key[i] >> kTopShift]++] = {cost[i], key[i], code};
            ++i;
        });
    }
    PROF("scatter")
    if (release_early) {
        release(ws.cost);
        release(ws.key);
    }
    uint32_t largest = 0;
    for (int b = 0; b < kTopBuckets; ++b) largest = std::max(largest, start[b + 1] - start[b]);
    SortedEdge* scratch = grow(ws.scratch, largest);
    for (int b = 0; b < kTopBuckets; ++b)
        sort_bucket(sorted + start[b], start[b + 1] - start[b], kTopShift, scratch);
    PROF("buckets")
    if (release_early) release(ws.scratch);

    return SortedEdges{H, W, sorted, n_edges};
}

// Union-find state of one scale: parent links with path halving, union by size, and per root the
// merge threshold Int(C) + scale / |C| rounded to float32 (scikit-image's `cdef float32_t
// inner_cost`), kept rather than recomputed since it changes only when the segment grows. A node
// holds its parent and threshold side by side, so reaching a root also brings in its threshold.
// Plain branches on purpose: timed on an idle machine, branch-free variants (fewer mispredictions
// in callgrind) were 1.4-2x slower for their extra loads and stores.
class Forest {
  public:
    Forest(Node* nodes, int32_t* size, uint32_t* rejected, int64_t n_pixels, double scale)
        : node_(nodes), size_(size), rejected_(rejected), n_pixels_(n_pixels),
          scale01_(scale / 255.0) {  // scale / 255: scikit-image rescales like the reference code
        const float single_pixel = threshold(0.0, 1);
        for (int64_t p = 0; p < n_pixels; ++p) {
            node_[p] = {static_cast<int32_t>(p), single_pixel};
            size_[p] = 1;
        }
    }

    // Pass 1 step: merge across the edge (a, b) when its cost is below both segments' thresholds.
    inline void visit(const SortedEdge& edge, int32_t a, int32_t b) {
        const int32_t ra = find(a), rb = find(b);
        if (ra == rb) return;
        if (edge.cost < static_cast<double>(std::min(node_[ra].threshold, node_[rb].threshold))) {
            const int32_t root = link(ra, rb);
            node_[root].threshold = threshold(edge.cost, size_[root]);
        } else {
            rejected_[n_rejected_++] = edge.code;
        }
    }

    void prefetch(int32_t pixel) const { __builtin_prefetch(node_ + pixel); }

    // Shared prefix of several scales. While this forest (the smallest scale: the lowest
    // thresholds) merges or skips every edge, so does every larger scale: with the same segments,
    // Int(C) + scale / |C| only grows with the scale. So the sorted edges up to this forest's first
    // rejection (a third to two thirds of them on photos) are visited once, not once per scale,
    // recording in last_merge[root] the edge that last grew each segment. Returns the index of the
    // first edge this forest would reject (not visited), or count.
    int64_t merge_until_first_rejection(const SortedEdge* items, int64_t count, const int64_t* offset,
                                        uint32_t* last_merge) {
        constexpr int64_t kAhead = 12;
        for (int64_t i = 0; i < count; ++i) {
            if (i + kAhead < count) {
                const EdgeEnds ahead = edge_ends(items[i + kAhead].code, offset);
                prefetch(ahead.a);
                prefetch(ahead.b);
            }
            const SortedEdge& edge = items[i];
            const EdgeEnds ends = edge_ends(edge.code, offset);
            const int32_t ra = find(ends.a), rb = find(ends.b);
            if (ra == rb) continue;
            if (!(edge.cost < static_cast<double>(std::min(node_[ra].threshold, node_[rb].threshold)))) return i;
            const int32_t root = link(ra, rb);
            node_[root].threshold = threshold(edge.cost, size_[root]);
            last_merge[root] = static_cast<uint32_t>(i);  // < 4 * kMaxPixels
        }
        return count;
    }

    // Takes the segments of the shared prefix from `lead`, with this scale's thresholds.
    void copy_segments(const Forest& lead, const SortedEdge* items, const uint32_t* last_merge) {
        std::copy(lead.node_, lead.node_ + n_pixels_, node_);
        std::copy(lead.size_, lead.size_ + n_pixels_, size_);
        for (int64_t p = 0; p < n_pixels_; ++p)
            if (node_[p].parent == p) node_[p].threshold = threshold(size_[p] == 1 ? 0.0 : items[last_merge[p]].cost, size_[p]);
    }

    // Pass 2: absorb segments below min_size, in edge order. Edges accepted in pass 1 join pixels
    // of one segment, so only the rejected ones can merge anything here.
    void absorb_small(int64_t min_size, const int64_t* offset) {
        if (min_size <= 1) return;
        for (int64_t i = 0; i < n_rejected_; ++i) {
            const EdgeEnds ends = edge_ends(rejected_[i], offset);
            const int32_t ra = find(ends.a), rb = find(ends.b);
            if (ra == rb) continue;
            if (size_[ra] < min_size || size_[rb] < min_size) link(ra, rb);
        }
    }

    // Labels 0..n-1 in raster order of each segment's first pixel (reuses the size array).
    int32_t write_labels(int32_t* labels) {
        int32_t* label_of_root = size_;
        for (int64_t p = 0; p < n_pixels_; ++p) label_of_root[p] = -1;
        int32_t next = 0;
        for (int64_t p = 0; p < n_pixels_; ++p) {
            const int32_t r = find(static_cast<int32_t>(p));
            if (label_of_root[r] < 0) label_of_root[r] = next++;
            labels[p] = label_of_root[r];
        }
        return next;
    }

  private:
    // Int(C) + scale / |C| rounded to float32, as scikit-image computes it (Int = 0 for one pixel).
    float threshold(double internal, int32_t size) const { return static_cast<float>(internal + scale01_ / size); }

    int32_t find(int32_t x) {
        while (node_[x].parent != x) {
            node_[x].parent = node_[node_[x].parent].parent;  // path halving
            x = node_[x].parent;
        }
        return x;
    }
    // Links two distinct roots, the larger segment keeping its root; returns that root.
    int32_t link(int32_t a, int32_t b) {
        if (size_[a] < size_[b]) std::swap(a, b);
        node_[b].parent = a;
        size_[a] += size_[b];
        return a;
    }

    Node* node_;
    int32_t* size_;
    uint32_t* rejected_;
    int64_t n_rejected_ = 0;
    int64_t n_pixels_;
    double scale01_;
};

// Pass 1 over the edges from `begin` for all forests in one sweep: the edge is decoded once, and
// the forests' independent union-find lookups overlap in the CPU. kForests > 0 fixes their number
// (1-3 scales: the unrolled inner loops measured 3-5% faster than looping over a vector); 0 takes
// n_forests. Edges visit pixels in random order: prefetching the nodes of both ends of the edge 12
// ahead measured 12% faster on three 640x480 scales (one end) and another 3-5% (both ends: the
// second pixel is in the next row for three edge types out of four).
template <int kForests>
void sweep(const SortedEdges& edges, const int64_t* offset, Forest* forests, size_t n_forests, int64_t begin) {
    const size_t n = kForests > 0 ? kForests : n_forests;
    constexpr int64_t kAhead = 12;
    for (int64_t i = begin; i < edges.count; ++i) {
        if (i + kAhead < edges.count) {
            const EdgeEnds ahead = edge_ends(edges.items[i + kAhead].code, offset);
            for (size_t f = 0; f < n; ++f) {
                forests[f].prefetch(ahead.a);
                forests[f].prefetch(ahead.b);
            }
        }
        const SortedEdge& edge = edges.items[i];
        const EdgeEnds ends = edge_ends(edge.code, offset);
        for (size_t f = 0; f < n; ++f) forests[f].visit(edge, ends.a, ends.b);
    }
}

std::vector<int32_t> segment(const SortedEdges& edges, const std::vector<double>& scales,
                             const std::vector<int64_t>& min_sizes, int32_t* labels) {
    const int64_t width = edges.width, n_pixels = edges.height * edges.width;
    const int64_t offset[4] = {1, width, width + 1, width - 1};
    const size_t n_scales = scales.size();
    Workspace& ws = workspace();
    PROF_START
    if (ws.forests.size() < n_scales) ws.forests.resize(n_scales);
    std::vector<Forest> forests;
    forests.reserve(n_scales);
    for (size_t s = 0; s < n_scales; ++s) {
        Workspace::ScaleBuffers& buffers = ws.forests[s];
        forests.emplace_back(grow(buffers.nodes, n_pixels), grow(buffers.size, n_pixels),
                             grow(buffers.rejected, edges.count), n_pixels, scales[s]);
    }
    // Pass 1, first the prefix the scales share (see merge_until_first_rejection: 7-10% off the
    // COCO recipe on 640x480 photos), then the rest for all scales in one sweep.
    int64_t first = 0;
    if (n_scales > 1) {
        const size_t lead = std::min_element(scales.begin(), scales.end()) - scales.begin();
        uint32_t* last_merge = grow(ws.last_merge, n_pixels);
        first = forests[lead].merge_until_first_rejection(edges.items, edges.count, offset, last_merge);
        for (size_t s = 0; s < n_scales; ++s)
            if (s != lead) forests[s].copy_segments(forests[lead], edges.items, last_merge);
    }
    PROF("shared prefix")
    switch (n_scales) {
        case 1: sweep<1>(edges, offset, forests.data(), 1, first); break;
        case 2: sweep<2>(edges, offset, forests.data(), 2, first); break;
        case 3: sweep<3>(edges, offset, forests.data(), 3, first); break;
        default: sweep<0>(edges, offset, forests.data(), n_scales, first); break;
    }
    PROF("pass 1")
    std::vector<int32_t> counts(n_scales);
    for (size_t s = 0; s < n_scales; ++s) {
        forests[s].absorb_small(min_sizes[s], offset);
        counts[s] = forests[s].write_labels(labels + s * n_pixels);
    }
    PROF("pass 2 and labels")
    return counts;
}

void release_scratch() { release_large_workspace(); }

std::vector<int32_t> felzenszwalb_multi(FloatImage image, const std::vector<double>& weights,
                                        const std::vector<double>& scales,
                                        const std::vector<int64_t>& min_sizes, int32_t* labels) {
    if (scales.size() != min_sizes.size())
        throw std::invalid_argument("scales and min_sizes must have the same length");
    if (image.height * image.width >= kMaxPixels)
        throw std::invalid_argument("image too large for FH segmentation (at most 2^30 pixels)");
    std::vector<int32_t> counts;
    try {
        gaussian_smooth(image, weights);
        counts = segment(sorted_edges(image), scales, min_sizes, labels);
    } catch (...) {  // std::bad_alloc half way: hand back what was grown for this image, as on success
        release_large_workspace();
        throw;
    }
    release_large_workspace();
    return counts;
}

}  // namespace fh
