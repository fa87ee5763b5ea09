// Felzenszwalb–Huttenlocher segmentation; see fh.hpp for what each step reproduces.
#include "fh.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

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

// Euclidean distance between two pixels of `channels` float64 values, in numpy's order:
// sqrt(sum((a - b) * (a - b), axis=-1)).
inline double colour_distance(const double* a, const double* b, int64_t channels) {
    if (channels == 1) {
        const double d = a[0] - b[0];
        return std::sqrt(d * d);
    }
    if (channels == 3) {
        const double d0 = a[0] - b[0], d1 = a[1] - b[1], d2 = a[2] - b[2];
        double s = d0 * d0;
        s += d1 * d1;
        s += d2 * d2;
        return std::sqrt(s);
    }
    if (channels < 8) {
        double s = 0.0;
        for (int64_t c = 0; c < channels; ++c) {
            const double d = a[c] - b[c];
            s += d * d;
        }
        return std::sqrt(s);
    }
    double squares[128];
    std::vector<double> big;
    double* sq = squares;
    if (channels > 128) {
        big.resize(channels);
        sq = big.data();
    }
    for (int64_t c = 0; c < channels; ++c) {
        const double d = a[c] - b[c];
        sq[c] = d * d;
    }
    return std::sqrt(numpy_pairwise_sum(sq, channels));
}

inline uint32_t float32_bits(double value) {
    const float f = static_cast<float>(value);
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    return bits;
}

// Union-find node: parent link, and for roots the segment size and internal difference.
struct Node {
    int32_t parent;
    int32_t size;
    double inner;
};

inline int32_t find_root(Node* nodes, int32_t x) {
    while (nodes[x].parent != x) {
        nodes[x].parent = nodes[nodes[x].parent].parent;  // path halving
        x = nodes[x].parent;
    }
    return x;
}

// Links two distinct roots; returns the new root (the larger segment keeps its root).
inline int32_t link_roots(Node* nodes, int32_t a, int32_t b) {
    if (nodes[a].size < nodes[b].size) std::swap(a, b);
    nodes[b].parent = a;
    nodes[a].size += nodes[b].size;
    return a;
}

constexpr uint32_t kPixelMask = (uint32_t(1) << 30) - 1;

}  // namespace

FloatImage from_uint8(const uint8_t* src, int64_t height, int64_t width, int64_t channels) {
    FloatImage image{height, width, channels, std::vector<double>(height * width * channels)};
    const double inv = 1.0 / 255.0;  // skimage multiplies by the reciprocal
    double lut[256];
    for (int v = 0; v < 256; ++v) lut[v] = static_cast<double>(v) * inv;
    const int64_t n = height * width * channels;
    for (int64_t i = 0; i < n; ++i) image.data[i] = lut[src[i]];
    return image;
}

FloatImage from_float64(const double* src, int64_t height, int64_t width, int64_t channels) {
    return FloatImage{height, width, channels,
                      std::vector<double>(src, src + height * width * channels)};
}

void gaussian_smooth(FloatImage& image, const std::vector<double>& weights) {
    if (weights.empty()) return;
    const int64_t radius = static_cast<int64_t>(weights.size() / 2);
    const double w0 = weights[radius];
    const int64_t H = image.height, W = image.width, C = image.channels;
    const int64_t row = W * C;
    std::vector<double> smoothed(image.data.size());

    // Axis 0: every output row is a weighted sum of whole input rows (vectorises over x, c).
    for (int64_t y = 0; y < H; ++y) {
        double* out = smoothed.data() + y * row;
        const double* centre = image.data.data() + y * row;
        for (int64_t i = 0; i < row; ++i) out[i] = centre[i] * w0;
        for (int64_t k = radius; k >= 1; --k) {
            const double* above = image.data.data() + reflect_index(y - k, H) * row;
            const double* below = image.data.data() + reflect_index(y + k, H) * row;
            const double wk = weights[radius - k];
            for (int64_t i = 0; i < row; ++i) out[i] += (above[i] + below[i]) * wk;
        }
    }

    // Axis 1: pad each row by reflection, then the same symmetric sum along x.
    std::vector<double> padded((W + 2 * radius) * C);
    for (int64_t y = 0; y < H; ++y) {
        const double* src = smoothed.data() + y * row;
        for (int64_t j = 0; j < W + 2 * radius; ++j) {
            const double* px = src + reflect_index(j - radius, W) * C;
            std::copy(px, px + C, padded.data() + j * C);
        }
        double* out = image.data.data() + y * row;
        const double* centre = padded.data() + radius * C;
        for (int64_t i = 0; i < row; ++i) out[i] = centre[i] * w0;
        for (int64_t k = radius; k >= 1; --k) {
            const double* left = centre - k * C;
            const double* right = centre + k * C;
            const double wk = weights[radius - k];
            for (int64_t i = 0; i < row; ++i) out[i] += (left[i] + right[i]) * wk;
        }
    }
}

std::vector<SortedEdge> sorted_edges(const FloatImage& image) {
    const int64_t H = image.height, W = image.width, C = image.channels;
    const double* px = image.data.data();
    const int64_t n_right = H * (W - 1), n_down = (H - 1) * W, n_diag = (H - 1) * (W - 1);
    const int64_t n_edges = n_right + n_down + 2 * n_diag;

    // Costs and codes in scikit-image's edge order: right, down, down-right, up-right; raster.
    std::vector<double> cost(n_edges);
    std::vector<uint32_t> code(n_edges);
    int64_t e = 0;
    double max_cost = 0.0;
    auto add = [&](uint32_t type, int64_t p, int64_t q) {
        const double c = colour_distance(px + q * C, px + p * C, C);
        cost[e] = c;
        code[e] = (type << 30) | static_cast<uint32_t>(p);
        max_cost = std::max(max_cost, c);
        ++e;
    };
    for (int64_t y = 0; y < H; ++y)
        for (int64_t x = 0; x + 1 < W; ++x) add(0, y * W + x, y * W + x + 1);
    for (int64_t y = 0; y + 1 < H; ++y)
        for (int64_t x = 0; x < W; ++x) add(1, y * W + x, y * W + x + W);
    for (int64_t y = 0; y + 1 < H; ++y)
        for (int64_t x = 0; x + 1 < W; ++x) add(2, y * W + x, y * W + x + W + 1);
    for (int64_t y = 0; y + 1 < H; ++y)
        for (int64_t x = 0; x + 1 < W; ++x) add(3, y * W + x + 1, y * W + x + W);

    // Stable bucket sort on a monotone key (float32 bits: even resolution in log space over the
    // top 16 octaves below the maximum), then a stable sort inside each bucket.
    constexpr int kShift = 10;
    constexpr uint32_t kBuckets = uint32_t(1) << 17;
    const uint32_t hi = float32_bits(max_cost);
    const uint32_t span = kBuckets << kShift;
    const uint32_t lo = hi > span ? hi - span : 0;
    auto bucket_of = [&](double c) -> uint32_t {
        const uint32_t bits = float32_bits(c);
        if (bits <= lo) return 0;
        return std::min<uint32_t>((bits - lo) >> kShift, kBuckets - 1);
    };
    std::vector<uint32_t> start(kBuckets + 1, 0);
    for (int64_t i = 0; i < n_edges; ++i) ++start[bucket_of(cost[i]) + 1];
    for (uint32_t b = 0; b < kBuckets; ++b) start[b + 1] += start[b];
    std::vector<SortedEdge> sorted(n_edges);
    {
        std::vector<uint32_t> fill(start.begin(), start.end() - 1);
        for (int64_t i = 0; i < n_edges; ++i) sorted[fill[bucket_of(cost[i])]++] = {cost[i], code[i]};
    }
    for (uint32_t b = 0; b < kBuckets; ++b) {
        SortedEdge* first = sorted.data() + start[b];
        SortedEdge* last = sorted.data() + start[b + 1];
        const int64_t n = last - first;
        if (n < 2) continue;
        if (n <= 32) {  // insertion sort; strict > keeps equal costs in edge order
            for (SortedEdge* it = first + 1; it < last; ++it) {
                const SortedEdge item = *it;
                SortedEdge* hole = it;
                while (hole > first && (hole - 1)->cost > item.cost) {
                    *hole = *(hole - 1);
                    --hole;
                }
                *hole = item;
            }
        } else {
            std::sort(first, last, [](const SortedEdge& a, const SortedEdge& b) {
                return a.cost < b.cost || (a.cost == b.cost && a.code < b.code);
            });
        }
    }
    return sorted;
}

int32_t segment(const std::vector<SortedEdge>& edges, int64_t height, int64_t width,
                double scale, int64_t min_size, int32_t* labels) {
    const int64_t n_pixels = height * width;
    const int64_t offset[4] = {1, width, width + 1, width - 1};
    const double scale01 = scale / 255.0;  // scikit-image rescales like the reference code
    std::vector<Node> nodes(n_pixels);
    for (int64_t p = 0; p < n_pixels; ++p) nodes[p] = {static_cast<int32_t>(p), 1, 0.0};
    Node* uf = nodes.data();

    // Pass 1: merge across an edge when its cost is below both segments' thresholds
    // (float32, as scikit-image's `cdef float32_t inner_cost`).
    std::vector<uint32_t> rejected;
    rejected.reserve(edges.size() / 4);
    for (const SortedEdge& edge : edges) {
        const int32_t a = static_cast<int32_t>(edge.code & kPixelMask);
        const int32_t b = static_cast<int32_t>(a + offset[edge.code >> 30]);
        const int32_t ra = find_root(uf, a), rb = find_root(uf, b);
        if (ra == rb) continue;
        const float threshold_a = static_cast<float>(uf[ra].inner + scale01 / uf[ra].size);
        const float threshold_b = static_cast<float>(uf[rb].inner + scale01 / uf[rb].size);
        if (edge.cost < static_cast<double>(std::min(threshold_a, threshold_b))) {
            uf[link_roots(uf, ra, rb)].inner = edge.cost;
        } else {
            rejected.push_back(edge.code);
        }
    }

    // Pass 2: absorb segments below min_size, in the same edge order. Edges accepted in pass 1
    // join pixels of one segment, so only the rejected ones can merge anything here.
    if (min_size > 1) {
        for (const uint32_t code : rejected) {
            const int32_t a = static_cast<int32_t>(code & kPixelMask);
            const int32_t b = static_cast<int32_t>(a + offset[code >> 30]);
            const int32_t ra = find_root(uf, a), rb = find_root(uf, b);
            if (ra == rb) continue;
            if (uf[ra].size < min_size || uf[rb].size < min_size) link_roots(uf, ra, rb);
        }
    }

    // Labels 0..n-1 in raster order of each segment's first pixel.
    std::vector<int32_t> label_of_root(n_pixels, -1);
    int32_t next = 0;
    for (int64_t p = 0; p < n_pixels; ++p) {
        const int32_t r = find_root(uf, static_cast<int32_t>(p));
        if (label_of_root[r] < 0) label_of_root[r] = next++;
        labels[p] = label_of_root[r];
    }
    return next;
}

std::vector<int32_t> felzenszwalb_multi(FloatImage image, const std::vector<double>& weights,
                                        const std::vector<double>& scales,
                                        const std::vector<int64_t>& min_sizes, int32_t* labels) {
    if (scales.size() != min_sizes.size())
        throw std::invalid_argument("scales and min_sizes must have the same length");
    if (image.height * image.width >= kMaxPixels)
        throw std::invalid_argument("image too large for FH segmentation (at most 2^30 pixels)");
    gaussian_smooth(image, weights);
    const std::vector<SortedEdge> edges = sorted_edges(image);
    const int64_t n_pixels = image.height * image.width;
    std::vector<int32_t> counts;
    for (size_t s = 0; s < scales.size(); ++s)
        counts.push_back(segment(edges, image.height, image.width, scales[s], min_sizes[s],
                                 labels + s * n_pixels));
    return counts;
}

}  // namespace fh
