// pybind11 bindings for rmae._fh. Validation and dtype conversion live in rmae/fh.py; these
// entry points take C-contiguous uint8 or float64 arrays [H, W, C] and release the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>

#include "fh.hpp"

namespace py = pybind11;

namespace {

// A borrowed view of one input image; valid while the Python array is alive.
struct ImageView {
    const void* data = nullptr;
    bool is_uint8 = false;
    int64_t height = 0, width = 0, channels = 0;
};

ImageView view_of(const py::array& array) {
    if (array.ndim() != 3) throw std::invalid_argument("expected a [H, W, C] array");
    if (!(array.flags() & py::array::c_style)) throw std::invalid_argument("expected a C-contiguous array");
    ImageView view;
    view.data = array.data();
    view.height = array.shape(0);
    view.width = array.shape(1);
    view.channels = array.shape(2);
    if (py::isinstance<py::array_t<uint8_t>>(array)) {
        view.is_uint8 = true;
    } else if (!py::isinstance<py::array_t<double>>(array)) {
        throw std::invalid_argument("expected a uint8 or float64 array");
    }
    return view;
}

fh::FloatImage to_float(const ImageView& v) {
    if (v.is_uint8)
        return fh::from_uint8(static_cast<const uint8_t*>(v.data), v.height, v.width, v.channels);
    return fh::from_float64(static_cast<const double*>(v.data), v.height, v.width, v.channels);
}

// Raises, as a Python exception, the error that image i of a batch threw: the type pybind11 would
// give it (std::bad_alloc -> MemoryError, std::invalid_argument -> ValueError, ...) with the message
// prefixed by "image i: ". Called with the GIL held.
[[noreturn]] void raise_for_image(size_t i, const std::exception_ptr& error) {
    const std::string prefix = "image " + std::to_string(i) + ": ";
    try {
        std::rethrow_exception(error);
    } catch (const std::exception& e) {
        // pybind11's translation order (detail/internals.h, translate_exception).
        PyObject* type = PyExc_RuntimeError;
        if (dynamic_cast<const std::bad_alloc*>(&e)) {
            type = PyExc_MemoryError;
        } else if (dynamic_cast<const std::domain_error*>(&e) || dynamic_cast<const std::invalid_argument*>(&e) ||
                   dynamic_cast<const std::length_error*>(&e) || dynamic_cast<const std::range_error*>(&e)) {
            type = PyExc_ValueError;
        } else if (dynamic_cast<const std::out_of_range*>(&e)) {
            type = PyExc_IndexError;
        } else if (dynamic_cast<const std::overflow_error*>(&e)) {
            type = PyExc_OverflowError;
        }
        PyErr_SetString(type, (prefix + e.what()).c_str());
        throw py::error_already_set();
    }
    // Anything else propagates unchanged (pybind11 translates it).
}

py::array_t<int32_t> segment(const py::array& image, const std::vector<double>& weights,
                             const std::vector<double>& scales, const std::vector<int64_t>& min_sizes) {
    const ImageView v = view_of(image);
    py::array_t<int32_t> labels({static_cast<int64_t>(scales.size()), v.height, v.width});
    int32_t* out = labels.mutable_data();
    {
        py::gil_scoped_release release;
        fh::felzenszwalb_multi(to_float(v), weights, scales, min_sizes, out);
    }
    return labels;
}

py::list segment_batch(const py::list& images, const std::vector<double>& weights,
                       const std::vector<double>& scales, const std::vector<int64_t>& min_sizes,
                       int64_t num_threads) {
    const size_t n = images.size();
    std::vector<ImageView> views;
    std::vector<py::array> keep_alive;
    std::vector<py::array_t<int32_t>> outputs;
    std::vector<int32_t*> out_ptrs;
    for (size_t i = 0; i < n; ++i) {
        py::array array = images[i].cast<py::array>();
        views.push_back(view_of(array));
        keep_alive.push_back(array);
        outputs.emplace_back(std::vector<int64_t>{static_cast<int64_t>(scales.size()), views.back().height,
                                                  views.back().width});
        out_ptrs.push_back(outputs.back().mutable_data());
    }
    std::vector<std::exception_ptr> errors(n);
    {
        py::gil_scoped_release release;
        std::atomic<size_t> next{0};
        auto worker = [&]() {
            for (size_t i = next++; i < n; i = next++) {
                try {
                    fh::felzenszwalb_multi(to_float(views[i]), weights, scales, min_sizes, out_ptrs[i]);
                } catch (...) {
                    errors[i] = std::current_exception();
                }
            }
        };
        const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(num_threads, static_cast<int64_t>(n)));
        std::vector<std::thread> pool;
        try {
            for (int64_t t = 1; t < threads; ++t) pool.emplace_back(worker);
        } catch (const std::exception&) {
            // No more threads to be had (std::system_error, std::bad_alloc): the ones started and
            // this one still take every image.
        }
        worker();
        for (auto& t : pool) t.join();
    }
    for (size_t i = 0; i < n; ++i)
        if (errors[i]) raise_for_image(i, errors[i]);
    py::list result;
    for (auto& o : outputs) result.append(o);
    return result;
}

py::array_t<double> smooth(const py::array& image, const std::vector<double>& weights) {
    const ImageView v = view_of(image);
    py::array_t<double> out({v.height, v.width, v.channels});
    {
        py::gil_scoped_release release;
        fh::FloatImage f = to_float(v);
        fh::gaussian_smooth(f, weights);
        const int64_t n = v.height * v.width;
        double* hwc = out.mutable_data();
        for (int64_t p = 0; p < n; ++p)  // planes -> channels last
            for (int64_t c = 0; c < v.channels; ++c) hwc[p * v.channels + c] = f.data[c * n + p];
    }
    return out;
}

py::tuple sorted_edges(const py::array& image) {
    const ImageView v = view_of(image);
    const fh::SortedEdges edges = fh::sorted_edges(to_float(v));
    py::array_t<double> costs(edges.count);
    py::array_t<uint32_t> codes(edges.count);
    double* cost_out = costs.mutable_data();
    uint32_t* code_out = codes.mutable_data();
    for (int64_t i = 0; i < edges.count; ++i) {
        code_out[i] = edges.items[i].code;
        cost_out[i] = edges.items[i].cost;
    }
    return py::make_tuple(costs, codes);
}

py::tuple edge_costs(const py::array& image, const std::vector<double>& weights) {
    const ImageView v = view_of(image);
    const int64_t n_edges = fh::edge_count(v.height, v.width);
    py::array_t<double> costs(n_edges);
    py::array_t<uint32_t> codes(n_edges);
    double* cost_out = costs.mutable_data();
    uint32_t* code_out = codes.mutable_data();
    {
        py::gil_scoped_release release;
        fh::FloatImage f = to_float(v);
        fh::gaussian_smooth(f, weights);
        const fh::EdgeCosts edges = fh::edge_costs(f);
        std::copy(edges.cost, edges.cost + edges.count, cost_out);
        fh::edge_codes(v.height, v.width, code_out);
        fh::release_scratch();
    }
    return py::make_tuple(costs, codes);
}

// Pass 1, pass 2 and labels over edges given in processing order by the caller: (cost, code) pairs
// of all edges of an H x W image (rmae.fh's tie_order="numpy": scikit-image's own np.argsort order).
py::array_t<int32_t> segment_in_order(int64_t height, int64_t width, const py::array_t<double>& costs,
                                      const py::array_t<uint32_t>& codes, const std::vector<double>& scales,
                                      const std::vector<int64_t>& min_sizes) {
    if (height < 1 || width < 1 || height >= fh::kMaxPixels || width >= fh::kMaxPixels ||
        height * width >= fh::kMaxPixels)
        throw std::invalid_argument("image size out of range");
    if (scales.size() != min_sizes.size() || scales.empty())
        throw std::invalid_argument("expected one min_size per scale, and at least one scale");
    const int64_t n_edges = fh::edge_count(height, width);
    if (costs.ndim() != 1 || codes.ndim() != 1 || costs.shape(0) != n_edges || codes.shape(0) != n_edges)
        throw std::invalid_argument("expected " + std::to_string(n_edges) + " costs and codes");
    if (!(costs.flags() & py::array::c_style) || !(codes.flags() & py::array::c_style))
        throw std::invalid_argument("expected C-contiguous costs and codes");
    py::array_t<int32_t> labels({static_cast<int64_t>(scales.size()), height, width});
    int32_t* out = labels.mutable_data();
    const double* cost = costs.data();
    const uint32_t* code = codes.data();
    {
        py::gil_scoped_release release;
        // Each edge of the image exactly once (the passes trust the codes): slot type * H * W + p of every
        // code fh::edge_codes lists is marked 1, and 2 once given.
        const int64_t n_pixels = height * width;
        std::vector<uint8_t> state(4 * n_pixels, 0);
        {
            std::vector<uint32_t> image_codes(n_edges);
            fh::edge_codes(height, width, image_codes.data());
            for (const uint32_t c : image_codes) state[(c >> 30) * n_pixels + (c & fh::kPixelMask)] = 1;
        }
        std::vector<fh::SortedEdge> items(n_edges);  // (after the codes' table is gone: a lower peak)
        for (int64_t i = 0; i < n_edges; ++i) {
            const int64_t p = code[i] & fh::kPixelMask;
            uint8_t* given = p < n_pixels ? &state[(code[i] >> 30) * n_pixels + p] : nullptr;
            if (given == nullptr || *given == 0)
                throw std::invalid_argument("edge code " + std::to_string(code[i]) + " is not an edge of the image");
            if (*given == 2) throw std::invalid_argument("edge code " + std::to_string(code[i]) + " given twice");
            *given = 2;
            items[i] = {cost[i], 0, code[i]};  // (the key only orders a sort, and the caller has sorted)
        }
        try {
            fh::segment(fh::SortedEdges{height, width, items.data(), n_edges}, scales, min_sizes, out);
        } catch (...) {
            fh::release_scratch();
            throw;
        }
        fh::release_scratch();
    }
    return labels;
}

}  // namespace

PYBIND11_MODULE(_fh, m) {
    m.doc() = "Felzenszwalb-Huttenlocher segmentation in C++ (use rmae.fh, which validates inputs)";
    m.def("segment", &segment, py::arg("image"), py::arg("weights"), py::arg("scales"), py::arg("min_sizes"),
          "uint8/float64 [H, W, C] -> int32 labels [S, H, W]; one smoothing and one sort for all scales");
    m.def("segment_batch", &segment_batch, py::arg("images"), py::arg("weights"), py::arg("scales"),
          py::arg("min_sizes"), py::arg("num_threads"), "segment() over a list of images on num_threads threads");
    m.def("smooth", &smooth, py::arg("image"), py::arg("weights"), "the Gaussian step alone (float64 [H, W, C])");
    m.def("sorted_edges", &sorted_edges, py::arg("image"),
          "(costs, codes) of all edges of an already smoothed image, in processing order");
    m.def("edge_costs", &edge_costs, py::arg("image"), py::arg("weights"),
          "(costs, codes) of all edges of the image smoothed with weights, in scikit-image's edge order");
    m.def("segment_in_order", &segment_in_order, py::arg("height"), py::arg("width"), py::arg("costs"),
          py::arg("codes"), py::arg("scales"), py::arg("min_sizes"),
          "passes 1, 2 and labels over all (cost, code) edges of an image in the given order -> int32 [S, H, W]");
    m.attr("MAX_PIXELS") = fh::kMaxPixels;
}
