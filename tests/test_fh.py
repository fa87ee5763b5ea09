"""rmae.fh against scikit-image 0.26: the same partition for every image and parameter set.

Exact ties between edge costs: scikit-image sorts the edges with numpy's default argsort, which is not
stable, and whose tie order depends on the CPU (numpy dispatches AVX-512, AVX2 or baseline sorts, and
on tie-heavy images such as uint8 with sigma=0 scikit-image's partition changes with it). rmae breaks
ties by scikit-image's edge order. The reference below is therefore scikit-image itself with its
argsort made stable, which fixes the tie order and nothing else; where no tie decides a merge
(every photo with sigma > 0), stock scikit-image is compared too.
"""
import contextlib
import subprocess
import sys
import textwrap
import warnings
from fractions import Fraction

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage import data
from skimage.segmentation import felzenszwalb as skimage_felzenszwalb
from skimage.transform import resize

from rmae import _fh, fh


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when a and b group the pixels identically (label values may differ)."""
    if a.shape != b.shape:
        return False
    pairs = np.unique(np.stack([a.ravel().astype(np.int64), b.ravel().astype(np.int64)]), axis=1)
    return pairs.shape[1] == len(np.unique(a)) == len(np.unique(b))


@contextlib.contextmanager
def stable_argsort():
    """scikit-image's Cython looks up np.argsort at call time: make it stable for the call."""
    original = np.argsort
    np.argsort = lambda a, *args, **kwargs: original(a, kind="stable")
    try:
        yield
    finally:
        np.argsort = original


def stock_reference(image, scale, sigma, min_size):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # skimage warns for more than 3 channels
        return skimage_felzenszwalb(image, scale, sigma, min_size, channel_axis=-1 if image.ndim == 3 else None)


def reference(image, scale, sigma, min_size):
    with stable_argsort():
        return stock_reference(image, scale, sigma, min_size)


def small_photo(name: str, size=(96, 128)) -> np.ndarray:
    image = getattr(data, name)()
    out = resize(image, size + image.shape[2:], order=1, anti_aliasing=True, preserve_range=True)
    return np.ascontiguousarray(out.round().clip(0, 255).astype(np.uint8))


PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera", "coins"]
SCALES = [1, 10, 100, 500, 1000, 1500]
MIN_SIZES = [0, 20, 100, 1000]


def flat_image(name: str) -> np.ndarray:
    """Drawings and binary pictures: large constant areas, so exact cost ties decide merges even with sigma > 0."""
    if name == "binary_blobs":
        return (data.binary_blobs(128, rng=1) * 255).astype(np.uint8)
    image = getattr(data, name)()
    if image.dtype == bool:
        return image.astype(np.uint8) * 255
    return image if image.dtype == np.uint8 else (image * 255).round().astype(np.uint8)


@pytest.mark.parametrize("name", ["horse", "checkerboard", "binary_blobs", "shepp_logan_phantom"])
def test_flat_images_take_the_stable_tie_order(name):
    """README's caveat, checked: on tie-heavy images with sigma > 0, rmae equals scikit-image with a
    stable argsort (stock scikit-image may differ there: its tie order is its CPU's sort's)."""
    image = flat_image(name)
    for sigma in (0.5, 0.8, 2):
        for scale in (1, 100, 1000):
            ours = fh.felzenszwalb(image, scale, sigma, 20)
            assert same_partition(ours, reference(image, scale, sigma, 20)), (sigma, scale)


def blocky_image(seed: int) -> np.ndarray:
    """Random colour blocks of 2-11 px: many exactly equal edge costs even after smoothing."""
    rng = np.random.default_rng(seed)
    block = int(rng.integers(2, 12))
    return rng.integers(0, 256, (6, 6, 3), dtype=np.uint8).repeat(block, 0).repeat(block, 1)


def test_numpy_tie_order_is_stock_scikit_image_on_this_machine():
    """tie_order="numpy" orders the edges with numpy's default argsort, as stock scikit-image does: the same
    partition as stock scikit-image on tie-heavy images where the tie order decides merges (blocky colour images
    at sigma 0 and 0.8, flat grayscale ones), through the single-scale, multi-scale and batch entry points."""
    images = [blocky_image(seed) for seed in range(40)] + [flat_image("horse"), flat_image("checkerboard")]
    decided_by_ties = 0
    for i, image in enumerate(images):
        for sigma in (0, 0.8):
            scales, min_sizes = [10.0, 100.0, 500.0], [0, 20, 5]
            stock = [stock_reference(image, scale, sigma, size) for scale, size in zip(scales, min_sizes)]
            single = fh.felzenszwalb(image, scales[1], sigma, min_sizes[1], tie_order="numpy")
            assert same_partition(single, stock[1]), (i, sigma)
            multi = fh.felzenszwalb_multi(image, scales, sigma, min_sizes, tie_order="numpy")
            assert all(same_partition(m, s) for m, s in zip(multi, stock)), (i, sigma)
            decided_by_ties += sum(not same_partition(m, r) for m, r in zip(
                fh.felzenszwalb_multi(image, scales, sigma, min_sizes), stock))
    batch = fh.felzenszwalb_batch(images[:6], [100, 500], 0.8, [20, 50], num_threads=2, tie_order="numpy")
    for image, labels in zip(images[:6], batch):
        assert labels.shape == (2,) + image.shape[:2]
        assert all(same_partition(labels[s], stock_reference(image, scale, 0.8, size))
                   for s, (scale, size) in enumerate([(100, 20), (500, 50)]))
    # the images are tie-heavy: many edges share their exact cost with another (machine-independent); where
    # numpy's sort is not stable on ties (any x86-64 numpy 2), the stable default then differs from stock
    # scikit-image on some of them (5 here), which depends on the machine's numpy and is only printed
    tie_heavy = {0: 0, 0.8: 0}  # images where a tenth of the edges or more share their cost with another
    for image in images:
        planes = (image if image.ndim == 3 else image[..., None]).astype(np.float64) / 255
        for sigma in tie_heavy:
            costs, _ = scikit_image_edge_order(ndi.gaussian_filter(planes, sigma=(sigma, sigma, 0)))
            tie_heavy[sigma] += len(costs) - len(np.unique(costs)) >= len(costs) // 10
    # all at sigma 0; at sigma 0.8 those of blocks over about 4 px (smoothing mixes smaller ones)
    assert tie_heavy[0] == len(images) and tie_heavy[0.8] >= len(images) // 2, tie_heavy
    print(f"{decided_by_ties} segmentations decided by the tie order")


def test_numpy_tie_order_on_photos_equals_the_stable_default():
    """On photos (sigma > 0), where no tie decides a merge, both orders give the same partition; gray and float
    inputs and a one-pixel-wide image take the numpy order too."""
    image = small_photo("astronaut")
    assert same_partition(fh.felzenszwalb(image, 300, 0.8, 50, tie_order="numpy"), fh.felzenszwalb(image, 300, 0.8, 50))
    gray = image[..., 0].astype(np.float32) / 255
    assert same_partition(fh.felzenszwalb(gray, 300, 0.8, 50, tie_order="numpy"), stock_reference(gray, 300, 0.8, 50))
    column = image[:, :1]
    assert same_partition(fh.felzenszwalb(column, 30, 0.8, 3, tie_order="numpy"), stock_reference(column, 30, 0.8, 3))
    with pytest.raises(ValueError, match=r"tie_order must be one of \('stable', 'numpy'\), got 'fast'"):
        fh.felzenszwalb(image, tie_order="fast")
    with pytest.raises(ValueError, match="tie_order must be one of"):
        fh.felzenszwalb_batch([image], [100], tie_order=None)


def test_edges_in_a_given_order_are_checked():
    """_fh.segment_in_order takes every edge of the image once, each a real edge: else a ValueError (the passes
    index pixels by the codes)."""
    image = small_photo("coffee")[:5, :4]
    costs, codes = _fh.sorted_edges(image.astype(np.float64) / 255)
    assert len(codes) == 5 * 3 + 4 * 4 + 2 * 4 * 3
    labels = _fh.segment_in_order(5, 4, costs, codes, [100.0], [3])
    assert same_partition(labels[0], fh.felzenszwalb(image, 100, 0, 3))
    duplicated = codes.copy()
    duplicated[1] = duplicated[0]
    with pytest.raises(ValueError, match="given twice"):
        _fh.segment_in_order(5, 4, costs, duplicated, [100.0], [3])
    # up-right edges start at x >= 1 (pixel 4 is (1, 0)); right edges end before the last column (pixel 3 is
    # (0, 3)); down edges before the last row (pixel 16 is (4, 0)); pixel 20 is outside the 5x4 image
    for edge_type, pixel in ((3, 4), (0, 3), (1, 16), (2, 16), (0, 20), (1, (1 << 30) - 1)):
        outside = codes.copy()
        outside[outside >> 30 == edge_type] = (edge_type << 30) | pixel
        with pytest.raises(ValueError, match="is not an edge of the image"):
            _fh.segment_in_order(5, 4, costs, outside, [100.0], [3])
    with pytest.raises(ValueError, match="expected 55 costs and codes"):
        _fh.segment_in_order(5, 4, costs[1:], codes[1:], [100.0], [3])


@pytest.mark.parametrize("sigma", [0, 0.5, 0.8, 2])
@pytest.mark.parametrize("name", PHOTOS)
def test_photos_match_scikit_image_over_the_parameter_grid(name, sigma):
    image = small_photo(name)
    for scale in SCALES:
        for min_size in MIN_SIZES:
            ours = fh.felzenszwalb(image, scale, sigma, min_size)
            assert ours.dtype == np.int32 and ours.shape == image.shape[:2]
            assert same_partition(ours, reference(image, scale, sigma, min_size)), (scale, sigma, min_size)
            if sigma > 0:
                assert same_partition(ours, stock_reference(image, scale, sigma, min_size)), (scale, sigma, min_size)


@pytest.mark.parametrize("name", ["astronaut", "camera"])
def test_float_and_full_resolution_photos_match(name):
    image = getattr(data, name)()
    as_float = image / 255.0  # float input is used as is, like scikit-image
    for scale, sigma, min_size in [(1000, 0.8, 1000), (500, 0.8, 500), (100, 2, 50)]:
        ours = fh.felzenszwalb(image, scale, sigma, min_size)
        assert same_partition(ours, stock_reference(image, scale, sigma, min_size))
    for scale, sigma, min_size in [(300, 0.5, 20), (1, 0, 0)]:
        assert same_partition(
            fh.felzenszwalb(as_float[:160, :200], scale, sigma, min_size),
            reference(as_float[:160, :200], scale, sigma, min_size),
        )


def test_a_two_megapixel_image_matches():
    """Past about 1.8 megapixels the C++ side hands each scratch buffer back as soon as it is dead (the image's
    edge buffers alone exceed what a thread keeps between images): the partitions stay scikit-image's, at one
    scale and at three, and a small image after it (buffers grown anew) too."""
    image = np.ascontiguousarray(np.tile(data.astronaut(), (3, 3, 1))[:, :1280])  # 1536 x 1280 x 3
    assert image.shape[0] * image.shape[1] * 4 * (16 + 8 + 4) > 192 * 2**20  # edges x (sorted, cost, key) bytes
    assert same_partition(fh.felzenszwalb(image, 1000, 0.8, 1000), stock_reference(image, 1000, 0.8, 1000))
    multi = fh.felzenszwalb_multi(image, [500, 1000, 1500], 0.8)
    assert same_partition(multi[1], fh.felzenszwalb(image, 1000, 0.8, 1000))
    assert same_partition(multi[0], fh.felzenszwalb(image, 500, 0.8, 500))
    small = small_photo("coffee")
    assert same_partition(fh.felzenszwalb(small, 100, 0.8, 20), reference(small, 100, 0.8, 20))


@pytest.mark.parametrize("channels", [None, 1, 2, 3, 4, 10])
@pytest.mark.parametrize("dtype", ["uint8", "float64"])
def test_random_noise_matches(channels, dtype):  # sigma=0 on uint8 noise: ties everywhere
    rng = np.random.default_rng(7 if channels is None else channels)
    shape = (37, 53) if channels is None else (37, 53, channels)
    image = rng.integers(0, 256, shape).astype(np.uint8) if dtype == "uint8" else rng.random(shape)
    for scale, sigma, min_size in [(1, 0, 0), (100, 0, 10), (100, 0.8, 20), (1000, 2, 100), (0, 0.5, 5)]:
        assert same_partition(
            fh.felzenszwalb(image, scale, sigma, min_size), reference(image, scale, sigma, min_size)
        ), (scale, sigma, min_size)


@pytest.mark.parametrize("shape", [(1, 1), (1, 17), (17, 1), (2, 2), (1, 1, 3), (3, 1, 3), (1, 9, 3)])
def test_degenerate_shapes_match(shape):
    image = np.random.default_rng(1).integers(0, 256, shape).astype(np.uint8)
    for scale, sigma, min_size in [(1, 0.8, 0), (100, 2, 3), (10, 0, 20)]:
        ours = fh.felzenszwalb(image, scale, sigma, min_size)
        assert ours.shape == shape[:2]
        assert same_partition(ours, reference(image, scale, sigma, min_size))


def test_constant_images_are_one_segment():
    for image in [np.full((20, 30, 3), 77, np.uint8), np.zeros((5, 5)), np.ones((4, 9, 2))]:
        ours = fh.felzenszwalb(image, 100, 0.8, 5)
        assert (ours == 0).all()
        assert same_partition(ours, reference(image, 100, 0.8, 5))


def test_other_dtypes_convert_like_scikit_image():
    base = small_photo("astronaut", (48, 64))
    variants = [
        base.astype(np.uint16) * 257,
        (base.astype(np.int16) - 128).astype(np.int8),
        base.astype(np.float32) / 255,
        base > 128,
        base.astype(np.int32) * 1000,
    ]
    for image in variants:
        for scale, sigma, min_size in [(100, 0.8, 20), (10, 0, 5)]:
            assert same_partition(
                fh.felzenszwalb(image, scale, sigma, min_size), reference(image, scale, sigma, min_size)
            ), image.dtype


def test_labels_are_numbered_in_raster_order_of_first_pixel():
    labels = fh.felzenszwalb(small_photo("coffee"), 100, 0.8, 20)
    first_seen = []
    for value in labels.ravel():
        if not first_seen or value > max(first_seen):
            first_seen.append(int(value))
    assert first_seen == list(range(labels.max() + 1))
    assert len(np.unique(labels)) == labels.max() + 1


def test_non_contiguous_inputs_just_work():
    image = getattr(data, "astronaut")()
    view = image[::3, ::2]  # strided
    fortran = np.asfortranarray(small_photo("chelsea"))
    channels_view = small_photo("rocket")[..., ::-1]  # BGR view, negative stride
    for array in (view, fortran, channels_view):
        assert same_partition(fh.felzenszwalb(array, 300, 0.8, 50), reference(np.ascontiguousarray(array), 300, 0.8, 50))


def test_multi_scale_equals_single_scale_calls():
    image = small_photo("astronaut", (120, 160))
    scales, min_sizes = [500, 1000, 1500], [500, 1000, 1500]
    multi = fh.felzenszwalb_multi(image, scales, 0.8, min_sizes)
    assert multi.shape == (3, 120, 160) and multi.dtype == np.int32
    for s in range(3):
        np.testing.assert_array_equal(multi[s], fh.felzenszwalb(image, scales[s], 0.8, min_sizes[s]))
    np.testing.assert_array_equal(fh.felzenszwalb_multi(image, scales, 0.8), multi)  # min sizes default to scales
    mixed = fh.felzenszwalb_multi(image, [10, 300], 0.5, [0, 77])
    np.testing.assert_array_equal(mixed[1], fh.felzenszwalb(image, 300, 0.5, 77))


@pytest.mark.parametrize(
    "image, scales, sigma",
    [
        (small_photo("coffee", (60, 80)), [1500, 1, 1500, 100, 0], 0.8),  # unsorted, repeated, zero
        (small_photo("camera", (60, 80)), [1e9, 1e12], 0.5),  # nothing rejected: the prefix is every edge
        (np.random.default_rng(5).integers(0, 256, (40, 50, 3), dtype=np.uint8), [300, 30, 3000], 0),  # ties
        (np.random.default_rng(6).random((30, 40)), [0.5, 50, 5], 2.0),
    ],
)
def test_multi_scale_shares_its_prefix_exactly(image, scales, sigma):
    """The scales share the edges up to the smallest scale's first rejection; each result is still
    scikit-image's (several scale orders, repeats, and prefixes from none to all of the edges)."""
    min_sizes = [20] * len(scales)
    multi = fh.felzenszwalb_multi(image, scales, sigma, min_sizes)
    for s, scale in enumerate(scales):
        assert same_partition(multi[s], reference(image, scale, sigma, 20)), f"scale {scale}"
        np.testing.assert_array_equal(multi[s], fh.felzenszwalb(image, scale, sigma, 20))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_batch_equals_one_by_one(threads):
    images = [small_photo(n, (64, 80)) for n in PHOTOS] + [np.random.default_rng(0).random((9, 31))]
    batch = fh.felzenszwalb_batch(images, [100, 1000], 0.8, [20, 1000], num_threads=threads)
    assert len(batch) == len(images)
    for image, labels in zip(images, batch):
        np.testing.assert_array_equal(labels, fh.felzenszwalb_multi(image, [100, 1000], 0.8, [20, 1000]))


@pytest.mark.parametrize("sigma", [0.3, 0.8, 2.0, 5.0])
@pytest.mark.parametrize("shape", [(40, 50, 3), (1, 7, 1), (5, 1, 2), (2, 3, 3), (9, 200, 1), (60, 1, 3), (33, 4, 1),
                                   (7, 15, 2), (40, 16, 1)])
def test_smoothing_is_bit_identical_to_scipy(shape, sigma):  # (narrower than 16: a whole plane at a time)
    image = np.random.default_rng(3).random(shape)
    expected = ndi.gaussian_filter(image, [sigma, sigma, 0], mode="reflect")
    np.testing.assert_array_equal(_fh.smooth(image, fh.gaussian_weights(sigma)), expected)
    photo = small_photo("astronaut")
    expected = ndi.gaussian_filter(photo * (1 / 255), [sigma, sigma, 0], mode="reflect")
    np.testing.assert_array_equal(_fh.smooth(photo, fh.gaussian_weights(sigma)), expected)


def test_tall_narrow_images_with_a_wide_kernel_match():
    """Images a few pixels wide are smoothed a plane at a time (row by row, 5,000,000 x 1 with sigma 30 took 20 s,
    scikit-image 12.6 s; now 3 s): bit-identical to scipy, also where the kernel is longer than the image, and the
    partitions are scikit-image's."""
    rng = np.random.default_rng(8)
    for shape, sigma in [((20000, 1, 3), 30.0), ((3000, 3, 3), 5.0), ((150, 2, 1), 30.0), ((500, 7, 3), 0.8)]:
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        np.testing.assert_array_equal(_fh.smooth(image, fh.gaussian_weights(sigma)),
                                      ndi.gaussian_filter(image * (1 / 255), [sigma, sigma, 0], mode="reflect"))
        assert same_partition(fh.felzenszwalb(image, 50, sigma, 10), reference(image, 50, sigma, 10)), shape


def scikit_image_edge_order(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(costs, codes) of an [H, W, C] image's edges as scikit-image computes them, sorted stably."""
    height, width = image.shape[:2]
    # scikit-image's cost expressions and edge order, sorted stably.
    down = np.sqrt(np.sum((image[1:] - image[:-1]) * (image[1:] - image[:-1]), axis=-1))
    right = np.sqrt(np.sum((image[:, 1:] - image[:, :-1]) * (image[:, 1:] - image[:, :-1]), axis=-1))
    dright = np.sqrt(np.sum((image[1:, 1:] - image[:-1, :-1]) * (image[1:, 1:] - image[:-1, :-1]), axis=-1))
    uright = np.sqrt(np.sum((image[1:, :-1] - image[:-1, 1:]) * (image[1:, :-1] - image[:-1, 1:]), axis=-1))
    costs = np.hstack([right.ravel(), down.ravel(), dright.ravel(), uright.ravel()])
    pixels = np.arange(height * width).reshape(height, width)
    first = np.hstack(
        [pixels[:, :-1].ravel(), pixels[:-1, :].ravel(), pixels[:-1, :-1].ravel(), pixels[:-1, 1:].ravel()]
    )
    types = np.repeat(np.arange(4), [right.size, down.size, dright.size, uright.size])
    order = np.argsort(costs, kind="stable")
    return costs[order], (types[order] << 30) | first[order]


def test_nan_costs_of_either_sign_sort_last_in_edge_order():
    """NaN costs (inputs that overflow in the smoothing) go last in edge order, as numpy's stable argsort
    puts them, whatever their sign bit (x86's default NaN is negative)."""
    nan, negative_nan = np.nan, np.copysign(np.nan, -1)
    rng = np.random.default_rng(5)
    image = rng.random((9, 11, 1))
    image[rng.random(image.shape) < 0.3] = nan
    image[rng.random(image.shape) < 0.3] = negative_nan
    expected_costs, expected_codes = scikit_image_edge_order(image)
    sorted_costs, codes = _fh.sorted_edges(np.ascontiguousarray(image))
    np.testing.assert_array_equal(codes, expected_codes)
    np.testing.assert_array_equal(sorted_costs, expected_costs)


@pytest.mark.parametrize("channels", [1, 3, 10])
def test_edges_are_scikit_image_costs_in_stable_sorted_order(channels):
    rng = np.random.default_rng(channels)
    image = np.round(rng.random((23, 31, channels)) * 8) / 8  # many exactly tied costs
    expected_costs, expected_codes = scikit_image_edge_order(image)
    sorted_costs, codes = _fh.sorted_edges(image)
    np.testing.assert_array_equal(sorted_costs, expected_costs)
    np.testing.assert_array_equal(codes, expected_codes)


def two_channel_rows(diffs: np.ndarray) -> np.ndarray:
    """[len(diffs), 2, 2] image whose row r has a right edge of colour difference diffs[r] (from
    (0, 0)); its diagonals repeat the same squared costs."""
    image = np.zeros((len(diffs), 2, 2))
    image[:, 1] = diffs
    return image


def test_distinct_squared_costs_with_one_square_root_go_in_edge_order():
    """Two sums of squares a few ulps apart can have one square root: equal costs, which numpy's stable
    argsort keeps in edge order (a sort on the squared costs would not). Cases: both squares under one
    float32 key, and under two (0x3effffff, 0x3f000000: two buckets of a sort on that key), each with
    the larger square first in edge order."""
    same_key = (0.6369616873214543, 0.26978671376386815, 0.2697867137638681)
    across_buckets = (0.2592919003070348, 0.6578508155607968, 0.6578508155607967)
    for a, b_large, b_small in (same_key, across_buckets):
        large, small = a * a + b_large * b_large, a * a + b_small * b_small
        assert large > small and np.sqrt(large) == np.sqrt(small)  # the premise of the case
        image = two_channel_rows(np.array([[a, b_large], [a, b_small]]))
        expected_costs, expected_codes = scikit_image_edge_order(image)
        sorted_costs, codes = _fh.sorted_edges(image)
        np.testing.assert_array_equal(codes, expected_codes)
        np.testing.assert_array_equal(sorted_costs, expected_costs)


def test_equal_cost_group_inside_a_run_of_equal_keys_out_of_order():
    """Equal costs (squares 2 ulps apart) next to a smaller, distinct cost that comes later in edge order,
    among 27 equal fillers of a nearby cost (a bucket of over 48 edges: the radix path): the smaller
    cost goes first, the equal ones in edge order."""
    a = b = 0.8
    larger_same_root = b + 2 * np.spacing(b)
    smaller_same_key = b - 1000 * np.spacing(b)
    filler = np.sqrt(1.26 - a * a)  # same bucket
    diffs = np.array([(a, b), (a, larger_same_root), (a, smaller_same_key)] + [(a, filler)] * 27)
    image = np.zeros((1, 2 * len(diffs) + 1, 2))
    image[0, 1::2] = diffs
    expected_costs, expected_codes = scikit_image_edge_order(image)
    sorted_costs, codes = _fh.sorted_edges(image)
    np.testing.assert_array_equal(codes, expected_codes)
    np.testing.assert_array_equal(sorted_costs, expected_costs)
    for scale in (0, 1e-3):
        assert same_partition(fh.felzenszwalb(image, scale, 0, 3), reference(image, scale, 0, 3))


def test_edge_order_with_many_groups_of_equal_costs_from_distinct_squares():
    """Hundreds of rows whose squared costs sit a few ulps apart, some around float32 rounding points
    (equal costs whose squares float32 rounds apart), shuffled, also scaled beyond float32's range,
    into its subnormals and under them: the order is numpy's stable argsort of the costs."""
    rng = np.random.default_rng(11)
    diffs = []
    for target in rng.random(40).tolist() + [0.5, 0.3, 0.25, 0.75, 1.5]:
        below = float(np.nextafter(np.float32(target), np.float32(0)))
        midpoint = (below + float(np.float32(target))) / 2  # float32 rounds squares on either side apart
        for centre in (target, midpoint):
            a = rng.random() * np.sqrt(centre)
            b = np.sqrt(centre - a * a)
            for step in rng.integers(-12, 13, size=8):
                diffs.append((a, b + step * np.spacing(b)))
    diffs = np.array(diffs)[rng.permutation(len(diffs))]
    image = two_channel_rows(diffs)
    squares = np.sort(np.sum(diffs * diffs, axis=-1))
    same_root = (np.diff(np.sqrt(squares)) == 0) & (np.diff(squares) != 0)
    keys = squares.astype(np.float32).view(np.uint32).astype(np.int64)
    assert same_root.sum() >= 20 and (same_root & (np.diff(keys) != 0)).sum() >= 1  # the cases are there
    for magnitude in (1, 1e20, 1e-21, 1e-25):  # squared costs beyond float32's range, subnormal, under it
        scaled = image * magnitude
        expected_costs, expected_codes = scikit_image_edge_order(scaled)
        sorted_costs, codes = _fh.sorted_edges(scaled)
        np.testing.assert_array_equal(codes, expected_codes)
        np.testing.assert_array_equal(sorted_costs, expected_costs)
    for scale in (0.5, 3, 50):
        assert same_partition(fh.felzenszwalb(image, scale, 0, 2), reference(image, scale, 0, 2))


def test_gaussian_weights_are_scipys_kernel():
    from scipy.ndimage._filters import _gaussian_kernel1d

    for sigma in (0.5, 0.8, 2.0):
        radius = int(4 * sigma + 0.5)
        np.testing.assert_array_equal(fh.gaussian_weights(sigma), _gaussian_kernel1d(sigma, 0, radius)[::-1])
    assert fh.gaussian_weights(0) == []


@pytest.mark.parametrize(
    "bad, error, message",
    [
        ([[1, 2], [3, 4]], TypeError, "numpy array"),
        (None, TypeError, "numpy array"),
        (np.zeros(5), ValueError, "2-D"),
        (np.zeros((2, 2, 2, 2)), ValueError, "2-D"),
        (np.zeros((0, 4, 3)), ValueError, "empty"),
        (np.array([[np.nan, 1.0]]), ValueError, "NaN"),
        (np.array([[np.inf, 1.0]]), ValueError, "NaN or infinite"),
        (np.zeros((2, 2), dtype=complex), TypeError, "dtype"),
        (np.array([["a"]]), TypeError, "dtype"),
    ],
)
def test_bad_images_raise_clear_errors(bad, error, message):
    with pytest.raises(error, match=message):
        fh.felzenszwalb(bad)


def test_scratch_memory_of_a_huge_image_is_released():
    """Per-thread scratch is reused between calls but bounded: after a 12-megapixel image (about 3 GB
    of scratch) the process does not keep it."""

    def rss_mb():
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS"))

    image = np.random.default_rng(0).integers(0, 256, (3000, 4000, 3), dtype=np.uint8)
    before = rss_mb()
    labels = fh.felzenszwalb_multi(image, [500, 1000, 1500], 0.8)
    assert labels.shape == (3, 3000, 4000)
    del labels
    assert rss_mb() - before < 300


def test_bad_parameters_raise_clear_errors():
    image = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="scale"):
        fh.felzenszwalb(image, scale=-1)
    with pytest.raises(ValueError, match="scale"):
        fh.felzenszwalb(image, scale=float("nan"))
    with pytest.raises(ValueError, match="sigma"):
        fh.felzenszwalb(image, sigma=-0.1)
    with pytest.raises(ValueError, match="min_size"):
        fh.felzenszwalb(image, min_size=-5)
    with pytest.raises(TypeError, match="min_size"):
        fh.felzenszwalb(image, min_size=2.5)
    with pytest.raises(ValueError, match="min_sizes"):
        fh.felzenszwalb_multi(image, [1, 2], 0.8, [1])
    with pytest.raises(ValueError, match="at least one"):
        fh.felzenszwalb_multi(image, [], 0.8, [])
    with pytest.raises(ValueError, match="num_threads"):
        fh.felzenszwalb_batch([image], [1], num_threads=0)
    with pytest.raises(ValueError, match="sigma must be a finite number"):  # beyond the float range
        fh.felzenszwalb(image, sigma=10**400)
    with pytest.raises(ValueError, match=r"sigma 1e\+300 is too large: its Gaussian kernel of radius 4e\+300"):
        fh.felzenszwalb(image, sigma=1e300)  # (numpy's own "Maximum allowed size exceeded" said nothing of sigma)
    for not_a_sequence in (100, "500"):  # (an int failed as 'not iterable', a string as its characters)
        with pytest.raises(TypeError, match="scales must be a sequence of numbers, one per scale"):
            fh.felzenszwalb_multi(image, not_a_sequence)
        with pytest.raises(TypeError, match="min_sizes must be a sequence of numbers"):
            fh.felzenszwalb_batch([image], [100], min_sizes=not_a_sequence)
    with pytest.raises(TypeError, match=r"a sequence of images .* shape \(4, 4, 3\)"):  # not 4 rows as images
        fh.felzenszwalb_batch(image, [1])
    # a 1-D object array of images (e.g. a pandas column's values) is a sequence of images
    images = np.empty(2, dtype=object)
    images[0], images[1] = image, image[:3]
    out = fh.felzenszwalb_batch(images, [1], sigma=0.8, min_sizes=[2])
    assert [o.shape for o in out] == [(1, 4, 4), (1, 3, 4)]
    assert np.array_equal(out[1][0], fh.felzenszwalb(image[:3], scale=1, sigma=0.8, min_size=2))


def test_misaligned_float_images_are_copied_aligned():
    """A float64 view at an odd byte offset is C-contiguous but not aligned: it must not reach C++ as is."""
    rng = np.random.default_rng(5)
    image = rng.random((9, 7, 3))
    buffer = np.zeros(image.nbytes + 1, np.uint8)
    view = np.ndarray(image.shape, np.float64, buffer=buffer, offset=1)
    view[...] = image
    assert not view.flags.aligned and view.flags.c_contiguous
    assert fh._as_image(view).flags.aligned
    np.testing.assert_array_equal(fh.felzenszwalb(view, 50, 0.8, 5), fh.felzenszwalb(image, 50, 0.8, 5))


@pytest.mark.parametrize("scale", [float("inf"), float("nan"), -1.0, 10**400, Fraction(10**400, 3)])
def test_bad_scales_are_rejected_before_default_min_sizes(scale):
    image = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="scale must be a finite number >= 0"):
        fh.felzenszwalb_multi(image, [scale])
    with pytest.raises(ValueError, match="scale must be a finite number >= 0"):
        fh.felzenszwalb_batch([image], [scale], num_threads=1)


def test_huge_min_sizes_are_range_checked_or_act_as_the_pixel_count():
    image = np.random.default_rng(2).integers(0, 256, (7, 9, 3)).astype(np.uint8)
    with pytest.raises(ValueError, match=r"min_size must be in 0\.\.9223372036854775807"):
        fh.felzenszwalb(image, 5, 0.8, 2**63)
    pixels = reference(image, 5, 0.8, 7 * 9)  # every min_size >= the pixel count acts alike
    assert same_partition(fh.felzenszwalb(image, 5, 0.8, 2**63 - 1), pixels)
    assert fh.default_min_sizes([1e300, 500.0]) == [_fh.MAX_PIXELS, 500]
    huge_scale = fh.felzenszwalb_multi(image, [1e300])  # default min_size from the scale, capped
    assert same_partition(huge_scale[0], reference(image, 1e300, 0.8, 7 * 9))
    np.testing.assert_array_equal(fh.felzenszwalb_batch([image], [1e300], num_threads=1)[0], huge_scale)


@pytest.mark.parametrize(
    "name, size, scale, sigma",
    [("camera", (120, 160), 1, np.float32(0.3)), ("astronaut", (96, 128), 1000, np.float16(0.8))],
)
def test_numpy_float32_and_float16_sigmas_match_scikit_image(name, size, scale, sigma):
    """scipy squares and divides a numpy sigma in its own precision (float32(0.3)**2 != 0.3**2 in
    float64): the kernel, and with it the partition, must follow."""
    from scipy.ndimage._filters import _gaussian_kernel1d

    image = small_photo(name, size)
    expected = stock_reference(image, scale, sigma, 20)
    assert same_partition(fh.felzenszwalb(image, scale, sigma, 20), expected)
    assert same_partition(fh.felzenszwalb_multi(image, [scale, 500], sigma, [20, 500])[0], expected)
    batch = fh.felzenszwalb_batch([image, image[::-1]], [scale], sigma, [20], num_threads=2)
    assert same_partition(batch[0][0], expected)
    assert same_partition(batch[1][0], stock_reference(np.ascontiguousarray(image[::-1]), scale, sigma, 20))
    for s in (sigma, np.float32(0.8), np.float16(0.3), np.float32(1.3), np.float16(2.0), np.array(np.float32(0.5))):
        weights = fh.gaussian_weights(s)
        expected_weights = _gaussian_kernel1d(s, 0, int(4 * float(s) + 0.5))[::-1]
        np.testing.assert_array_equal(weights, expected_weights)  # bit for bit
        photo = small_photo("coffee", (40, 50)) * (1 / 255)
        np.testing.assert_array_equal(
            _fh.smooth(photo, weights), ndi.gaussian_filter(photo, [s, s, 0], mode="reflect")
        )


@pytest.mark.parametrize(
    "magnitude, scales",
    [(1e-50, [0, 1e-48]), (1e40, [100]), (1e-40, [0, 1e-38, 1e-37]), (1e-300, [0])],
)
def test_costs_outside_float32_range_sort_and_match(magnitude, scales):
    """Edge costs below or above float32's range all round to one float32 sort key (0 or inf), so the
    edges fall in one bucket that only the exact costs order; costs near 1e-40 are float32 subnormals,
    whose keys are coarse. This once ran an insertion sort over the whole bucket: quadratic, about 15 s
    for each 300x300 call here (3 s at 200x200), now a few milliseconds. The size keeps that visible in
    the test's run time; the assertions are the partition and the exact stable edge order."""
    image = np.random.default_rng(0).random((300, 300, 3)) * magnitude
    for scale in scales:
        for sigma in (0, 0.8):
            for min_size in (5, 20):
                assert same_partition(
                    fh.felzenszwalb(image, scale, sigma, min_size), reference(image, scale, sigma, min_size)
                ), (scale, sigma, min_size)
    tied = np.round(np.random.default_rng(1).random((40, 50, 3)) * 8) / 8 * magnitude  # long runs of equal costs
    for array in (image[:60, :70], tied):
        expected_costs, expected_codes = scikit_image_edge_order(array)
        sorted_costs, codes = _fh.sorted_edges(np.ascontiguousarray(array))
        np.testing.assert_array_equal(sorted_costs, expected_costs)
        np.testing.assert_array_equal(codes, expected_codes)


def test_masked_arrays_are_their_data_and_long_double_is_refused():
    rng = np.random.default_rng(4)
    data_ = rng.random((20, 30))
    masked = np.ma.masked_array(data_, mask=data_ > 0.5)
    np.testing.assert_array_equal(fh.felzenszwalb(masked, 100, 0.8, 5), fh.felzenszwalb(data_, 100, 0.8, 5))
    assert same_partition(fh.felzenszwalb(masked, 100, 0.8, 5), reference(masked, 100, 0.8, 5))
    with_nan = data_.copy()
    with_nan[3, 4] = np.nan
    with_nan[10, 10] = np.copysign(np.nan, -1)
    with pytest.raises(ValueError, match="NaN"):  # NaN under the mask is still NaN
        fh.felzenszwalb(np.ma.masked_invalid(with_nan), 1, 0, 2)
    with pytest.raises(ValueError, match="image 1: image contains NaN"):
        fh.felzenszwalb_batch([data_, np.ma.masked_invalid(with_nan)], [1], 0, [2], num_threads=1)
    if np.dtype(np.longdouble).itemsize > 8:  # float96/float128: scikit-image refuses it, and so do we
        huge = np.full((6, 7), 0.5, dtype=np.longdouble)
        huge[2, 3] = np.longdouble("1e400")  # finite as a long double, inf as float64
        for image in (huge, np.full((6, 7), 0.5, dtype=np.longdouble)):
            with pytest.raises(ValueError, match="Cannot convert from float(96|128) to float64"):
                fh.felzenszwalb(image, 100, 0.8, 2)
            with pytest.raises(ValueError, match="Cannot convert"):
                stock_reference(image, 100, 0.8, 2)


@pytest.mark.parametrize("min_size", [np.float64(2**63), np.float32(2**63), 2.0**63, np.float64(1e19), np.uint64(2**63)])
def test_float_min_sizes_beyond_int64_are_range_checked(min_size):
    image = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match=r"min_size must be in 0\.\.9223372036854775807"):
        fh.felzenszwalb(image, 5, 0.8, min_size)
    with pytest.raises(ValueError, match=r"min_size must be in 0\.\.9223372036854775807"):
        fh.felzenszwalb_batch([image], [5], 0.8, [min_size], num_threads=1)


def test_num_threads_is_validated_and_clamped():
    images = [small_photo("coffee", (30, 40)), np.random.default_rng(0).random((9, 31))]
    expected = [fh.felzenszwalb_multi(image, [100, 1000], 0.8) for image in images]
    for threads in (2**31, 2**40, 10**20, np.int64(2**62), np.array(3), 1, 2):
        result = fh.felzenszwalb_batch(images, [100, 1000], 0.8, num_threads=threads)
        for labels, want in zip(result, expected):
            np.testing.assert_array_equal(labels, want)
    for threads in (float("nan"), float("inf"), 2.0, np.float64(2.5), "2", True, [2]):
        with pytest.raises(TypeError, match="num_threads must be an integer"):
            fh.felzenszwalb_batch(images, [100], num_threads=threads)
    for threads in (0, -1, -(2**40)):
        with pytest.raises(ValueError, match="num_threads must be >= 1"):
            fh.felzenszwalb_batch(images, [100], num_threads=threads)
    assert fh.felzenszwalb_batch([], [100], num_threads=2**31) == []


def test_cpp_errors_in_a_batch_name_the_image():
    """An error thrown in a worker thread reaches Python with its pybind11 type and the image index.
    An [H, W, 0] image holds no data, so a 2**30-pixel one costs nothing but trips the C++ size check
    (rmae.fh refuses it before, so the extension is called directly)."""
    ok = np.zeros((4, 5, 3), np.uint8)
    too_many_pixels = np.zeros((2**15, 2**15, 0))
    with pytest.raises(ValueError, match=r"^image 2: image too large"):
        _fh.segment_batch([ok, ok, too_many_pixels, ok, too_many_pixels], [], [], [], 2)
    with pytest.raises(ValueError, match=r"^image 0: scales and min_sizes"):
        _fh.segment_batch([ok, ok], [], [1.0], [], 2)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="address-space limit via RLIMIT_AS")
def test_out_of_memory_in_a_batch_is_memory_error():
    """A failed allocation inside a batch raises MemoryError naming the image, as outside a batch. Run
    in a child process whose address space is capped just above what it already uses."""
    script = textwrap.dedent(
        """
        import resource
        import numpy as np
        from rmae import fh
        image = np.random.default_rng(0).integers(0, 256, (1500, 2000, 3), dtype=np.uint8)
        small = np.zeros((8, 9, 3), np.uint8)
        with open("/proc/self/status") as status:
            used = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize"))
        resource.setrlimit(resource.RLIMIT_AS, (used + (150 << 20), resource.RLIM_INFINITY))
        for call in (lambda: fh.felzenszwalb_multi(image, [100]),
                     lambda: fh.felzenszwalb_batch([small, image], [100], num_threads=1)):
            try:
                call()
                print("no error")
            except MemoryError as error:
                print("MemoryError", error)
            except Exception as error:
                print(type(error).__name__, error)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and len(lines) == 2, (result.stdout, result.stderr)
    assert lines[0].startswith("MemoryError"), lines
    assert lines[1].startswith("MemoryError image 1: "), lines


def test_scales_may_be_an_iterator():
    image = small_photo("chelsea", (40, 50))
    expected = fh.felzenszwalb_multi(image, [100, 1000], 0.8)
    np.testing.assert_array_equal(fh.felzenszwalb_multi(image, iter([100, 1000]), 0.8), expected)
    np.testing.assert_array_equal(fh.felzenszwalb_multi(image, (s for s in (100, 1000)), 0.8), expected)
    batch = fh.felzenszwalb_batch([image], (s for s in (100, 1000)), 0.8, num_threads=1)
    np.testing.assert_array_equal(batch[0], expected)
    np.testing.assert_array_equal(
        fh.felzenszwalb_multi(image, iter([100, 1000]), 0.8, iter([20, 1000])),
        fh.felzenszwalb_multi(image, [100, 1000], 0.8, [20, 1000]),
    )


def test_batch_input_errors_name_the_image():
    ok = np.zeros((4, 5, 3), np.uint8)
    with pytest.raises(ValueError, match=r"^image 3: image contains NaN or infinite values"):
        fh.felzenszwalb_batch([ok, ok, ok, np.array([[np.nan, 1.0]])], [100])
    with pytest.raises(TypeError, match=r"^image 1: image must be a numpy array"):
        fh.felzenszwalb_batch([ok, [[1, 2]], ok], [100])
    with pytest.raises(ValueError, match=r"^image 0: image is empty"):
        fh.felzenszwalb_batch([np.zeros((0, 3))], [100])
    with pytest.raises(TypeError, match=r"^image 2: image dtype"):
        fh.felzenszwalb_batch([ok, ok, np.zeros((2, 2), complex)], [100])


def test_non_numbers_are_type_errors_and_0d_arrays_are_scalars():
    image = small_photo("coffee", (40, 50))
    for bad in ("100", None, 3 + 0j, [100.0], np.array([100.0]), np.complex128(1)):
        with pytest.raises(TypeError, match="scale must be a real number"):
            fh.felzenszwalb(image, bad, 0.8, 5)
        with pytest.raises(TypeError, match="scale must be a real number"):
            fh.felzenszwalb_multi(image, [100, bad])
        with pytest.raises(TypeError, match="sigma must be a real number"):
            fh.felzenszwalb(image, 100, bad, 5)
        with pytest.raises(TypeError, match="sigma must be a real number"):
            fh.gaussian_weights(bad)
    for scale, sigma, min_size in [
        (np.array(100.0), np.array(0.8), 5),
        (np.array(300), np.array(np.float32(0.3)), np.array(20)),
        (np.array(50.0), 0.5, 10),
    ]:
        expected = stock_reference(image, scale, sigma, int(min_size))
        assert same_partition(fh.felzenszwalb(image, scale, sigma, min_size), expected)
        assert same_partition(fh.felzenszwalb_multi(image, [scale], sigma)[0], reference(image, scale, sigma, int(scale)))
    with pytest.raises(ValueError, match="scale must be a finite number"):
        fh.felzenszwalb(image, np.array(-1.0))
    with pytest.raises(ValueError, match="sigma must be a finite number"):
        fh.felzenszwalb(image, 100, np.array(np.inf))
