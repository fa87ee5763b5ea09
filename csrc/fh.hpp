// Felzenszwalb–Huttenlocher graph segmentation, partition-identical to scikit-image 0.26.
//
// Pipeline (each step reproduces scikit-image/scipy/numpy bit for bit where it matters):
//   1. image -> float64 in [0, 1] (uint8: x * (1/255), as skimage.img_as_float64)
//   2. separable Gaussian (scipy.ndimage.gaussian_filter, mode 'reflect', axis 0 then axis 1,
//      symmetric-kernel summation order of scipy's NI_Correlate1D)
//   3. 8-connected edges (right, down, down-right, up-right) with Euclidean colour cost
//      (channel sum in numpy's order)
//   4. one stable sort of the edges by cost (ties keep scikit-image's edge order)
//   5. per scale: greedy merge pass with float32 thresholds (several scales visit the edges up to
//      the smallest scale's first rejection once, together), then a min_size pass over the edges
//      rejected by the first pass; labels 0..n-1 in raster order of first pixel.
#pragma once

#include <cstdint>
#include <vector>

namespace fh {

// One edge: its exact cost, the cost's float32 bit pattern (a sort key monotone in the cost) and
// code = type << 30 | p for the edge from pixel p to p + offset[type] (offsets 1, W, W + 1, W - 1).
// Ascending codes are scikit-image's edge order.
struct SortedEdge {
    double cost;
    uint32_t key;
    uint32_t code;
};

// All edges of an image sorted by cost, equal costs in scikit-image's edge order. A view into the
// calling thread's scratch space, valid until its next sorted_edges call.
struct SortedEdges {
    int64_t height = 0, width = 0;
    const SortedEdge* items = nullptr;
    int64_t count = 0;
};

// An image in float64 as channel planes: data[(c * height + y) * width + x]. The pixels live in
// the calling thread's scratch space (valid until its next from_* call).
struct FloatImage {
    int64_t height = 0, width = 0, channels = 0;
    double* data = nullptr;
    int64_t size() const { return height * width * channels; }
};

// Largest number of pixels an image may have (edge codes keep the pixel index in 30 bits).
constexpr int64_t kMaxPixels = int64_t(1) << 30;
// An edge code's pixel bits (code = type << 30 | p).
constexpr uint32_t kPixelMask = (uint32_t(1) << 30) - 1;

// uint8 [H, W, C] channels last -> planes in [0, 1], exactly as skimage.img_as_float64.
FloatImage from_uint8(const uint8_t* src, int64_t height, int64_t width, int64_t channels);
// float64 [H, W, C] channels last -> planes, values as they are.
FloatImage from_float64(const double* src, int64_t height, int64_t width, int64_t channels);

// Gaussian smoothing of both spatial axes; `weights` has 2r+1 symmetric taps (scipy's kernel,
// computed by the caller). An empty kernel means no smoothing. The result is written to another
// scratch buffer of the thread, and image.data then points to it.
void gaussian_smooth(FloatImage& image, const std::vector<double>& weights);

// The costs of all edges of the smoothed image in edge order (right, down, down-right, up-right edges, raster
// order within a type: scikit-image's order), with their float32 keys. A view into the calling thread's
// scratch space, valid until its next edge_costs or sorted_edges call.
struct EdgeCosts {
    const double* cost = nullptr;
    const uint32_t* key = nullptr;
    int64_t count = 0;
};
EdgeCosts edge_costs(const FloatImage& image);

// How many 8-connected edges a height x width image has (right, down and both diagonal ones).
inline int64_t edge_count(int64_t height, int64_t width) {
    return height * (width - 1) + (height - 1) * width + 2 * (height - 1) * (width - 1);
}

// The codes (type << 30 | p, as in SortedEdge) of all edges of a height x width image, in edge order.
void edge_codes(int64_t height, int64_t width, uint32_t* codes);

// All 8-connected edges of the smoothed image, sorted by cost.
SortedEdges sorted_edges(const FloatImage& image);

// Segments every scale from the shared sorted edges; writes int32 labels [S, H * W].
// Returns the number of segments per scale.
std::vector<int32_t> segment(const SortedEdges& edges, const std::vector<double>& scales,
                             const std::vector<int64_t>& min_sizes, int32_t* labels);

// Hands back the calling thread's scratch space if it holds more than a COCO-sized image needs
// (felzenszwalb_multi does so itself; for callers of segment).
void release_scratch();

// Whole pipeline for several scales sharing one smoothing and one sort.
// labels: S * H * W int32; returns the segment count per scale.
std::vector<int32_t> felzenszwalb_multi(FloatImage image, const std::vector<double>& weights,
                                        const std::vector<double>& scales,
                                        const std::vector<int64_t>& min_sizes, int32_t* labels);

}  // namespace fh
