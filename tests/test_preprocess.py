"""python -m rmae.preprocess, the mask files and image decoding, on temporary dataset trees."""
import errno
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zstandard
from PIL import Image
from skimage import data

from rmae import fh
from rmae import preprocess as preprocess_module
from rmae.image_io import ImageDecodeError, load_rgb
from rmae.masks import MaskError, find_mask, load_labels, mask_path, save_labels
from rmae.preprocess import list_images, main

SMALL = (72, 96)


def photo(name: str, size=SMALL) -> np.ndarray:
    return np.asarray(Image.fromarray(getattr(data, name)()).resize(size[::-1], Image.BICUBIC))


def expected_masks(path: Path, scales=(500, 1000, 1500)) -> np.ndarray:
    return fh.felzenszwalb_multi(load_rgb(path), scales, 0.8, scales)


@pytest.fixture
def coco_tree(tmp_path: Path) -> Path:
    """A COCO-shaped tree: 4 photos, a grayscale one, a corrupt file and a truncated JPEG."""
    images = tmp_path / "coco" / "image" / "val2017"
    images.mkdir(parents=True)
    for i, name in enumerate(["astronaut", "coffee", "chelsea", "rocket"]):
        Image.fromarray(photo(name)).save(images / f"{i:012d}.jpg", quality=90)
    Image.fromarray(photo("camera")).save(images / "000000000099.jpg")
    (images / "000000000100.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    whole = (images / "000000000000.jpg").read_bytes()
    (images / "000000000101.jpg").write_bytes(whole[: len(whole) // 2])
    return tmp_path


def test_coco_split_end_to_end_with_failures(coco_tree, capsys):
    code = main(["--dataset", "coco", "--split", "val2017", "--root", str(coco_tree), "--workers", "2"])
    assert code == 1  # two undecodable files
    masks = coco_tree / "coco" / "image" / "fh_val2017"
    written = sorted(p.name for p in masks.glob("*.npy.zst"))
    assert written == [f"{i:012d}.npy.zst" for i in (0, 1, 2, 3, 99)]
    for name in written:
        labels = load_labels(masks / name)
        assert labels.dtype == np.uint16 and labels.shape == (3, *SMALL)
        source = coco_tree / "coco" / "image" / "val2017" / name.replace(".npy.zst", ".jpg")
        np.testing.assert_array_equal(labels, expected_masks(source))
    failures = (masks / "preprocess_failures.tsv").read_text().splitlines()
    assert [line.split("\t")[0].rsplit("/", 1)[1] for line in failures] == ["000000000100.jpg", "000000000101.jpg"]
    assert "truncated" in failures[1]
    captured = capsys.readouterr()
    assert "5 written" in captured.out and "--allow-bad-images makes such a run exit with status 0" in captured.err
    # the rerun tries the two again; with --allow-bad-images, images training does without end it with 0
    args = ["--dataset", "coco", "--split", "val2017", "--root", str(coco_tree)]
    assert main(args) == 1
    assert main([*args, "--allow-bad-images"]) == 0
    assert len((masks / "preprocess_failures.tsv").read_text().splitlines()) == 2  # still listed


def test_rerun_skips_finished_files_and_cleans_partial_writes(coco_tree):
    args = ["--dataset", "coco", "--split", "val2017", "--root", str(coco_tree), "--workers", "1"]
    main(args)
    masks = coco_tree / "coco" / "image" / "fh_val2017"
    done = masks / "000000000001.npy.zst"
    before = done.stat().st_mtime_ns
    (masks / "000000000002.npy.zst").unlink()  # as if the run had stopped before it
    stale = masks / ".000000000002.npy.zst.abc123.tmp"  # a write interrupted mid-way
    stale.write_bytes(b"partial")
    main(args)
    assert done.stat().st_mtime_ns == before
    assert (masks / "000000000002.npy.zst").is_file() and not stale.exists()


def test_killed_run_resumes_to_complete_correct_masks(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(24):
        Image.fromarray(photo(["astronaut", "coffee", "chelsea"][i % 3], (180, 240))).save(images / f"{i:03d}.png")
    out = tmp_path / "masks"
    command = [sys.executable, "-m", "rmae.preprocess", "--images", str(images), "--out", str(out), "--workers", "1"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and len(list(out.glob("*.npy.zst"))) < 2:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = len(list(out.glob("*.npy.zst")))
    assert 2 <= partial < 24, "the run should have been killed part-way"
    assert subprocess.run(command, capture_output=True).returncode == 0
    for i in range(24):
        np.testing.assert_array_equal(load_labels(out / f"{i:03d}.npy.zst"), expected_masks(images / f"{i:03d}.png"))
    assert not list(out.glob(".*.tmp"))


def test_sigterm_stops_soon_with_a_message_and_the_rerun_completes(tmp_path):
    """SIGTERM (a Slurm job's end, kill) is handled as Ctrl-C: the images being segmented finish, the queued ones
    are dropped (no waiting for them), the run says what happened and exits with 143."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(24):
        Image.fromarray(photo(["astronaut", "coffee", "chelsea"][i % 3], (360, 480))).save(images / f"{i:03d}.png")
    out = tmp_path / "masks"
    out.mkdir()
    (out / "preprocess_failures.tsv").write_text("gone.png\tan earlier run's failure\n")
    command = [sys.executable, "-m", "rmae.preprocess", "--images", str(images), "--out", str(out), "--workers", "2"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and len(list(out.glob("*.npy.zst"))) < 2:
        time.sleep(0.01)
    done = len(list(out.glob("*.npy.zst")))
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143, err
    assert "terminated (SIGTERM): the masks written so far are kept; run the same command again" in err
    assert "Traceback" not in err
    assert len(list(out.glob("*.npy.zst"))) <= done + 2 + 1  # and the 2 being made (+1: timing), not the 8 queued
    assert not (out / "preprocess_failures.tsv").exists()  # an earlier run's list (below) is not left as this one's
    assert subprocess.run(command, capture_output=True).returncode == 0
    assert len(list(out.glob("*.npy.zst"))) == 24 and not list(out.glob(".*.tmp"))


def test_imagenet_layout_and_recipe(tmp_path):
    for split, classes in [("train", ["n01", "n02"]), ("val", ["n01"])]:
        for c in classes:
            folder = tmp_path / "imnet" / split / c  # the imnet/ spelling is accepted too
            folder.mkdir(parents=True)
            Image.fromarray(photo("coffee")).save(folder / f"{c}_1.JPEG")
    assert main(["--dataset", "imnet", "--split", "train", "--root", str(tmp_path)]) == 0
    assert main(["--dataset", "imagenet", "--split", "val", "--root", str(tmp_path)]) == 0  # the other name
    assert (tmp_path / "imnet" / "fh_val" / "n01" / "n01_1.npy.zst").is_file()
    labels = load_labels(tmp_path / "imnet" / "fh_train" / "n02" / "n02_1.npy.zst")
    assert labels.shape == (1, *SMALL)  # ImageNet recipe: one scale, 1000 / 1000
    np.testing.assert_array_equal(labels[0], fh.felzenszwalb(load_rgb(tmp_path / "imnet/train/n02/n02_1.JPEG"), 1000, 0.8, 1000))


def test_generic_mode_custom_recipe_and_recipe_change_is_refused(tmp_path, capsys):
    images = tmp_path / "in" / "nested"
    images.mkdir(parents=True)
    Image.fromarray(photo("rocket")).save(images / "r.png")
    out = tmp_path / "out"
    assert main(["--images", str(tmp_path / "in"), "--out", str(out), "--scales", "100,300", "--sigma", "0.5"]) == 0
    labels = load_labels(out / "nested" / "r.npy.zst")
    np.testing.assert_array_equal(labels, fh.felzenszwalb_multi(photo("rocket"), [100, 300], 0.5, [100, 300]))
    capsys.readouterr()
    # refused, exit status 2 (1 means: some images failed, see the failures file)
    assert main(["--images", str(tmp_path / "in"), "--out", str(out), "--scales", "200"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"^error: .* holds masks made with FH scales 100,300, min sizes 100,300, sigma 0.5, not with "
                     r"FH scales 200, min sizes 200, sigma 0.8\.\n.*--overwrite", err, re.S), err
    # the suggested command makes them in a folder of their own (dataset mode takes no --out: generic mode)
    command = f"python -m rmae.preprocess --images {tmp_path / 'in'} --out {tmp_path / 'out_200'} --scales 200 " \
              "--min-sizes 200"
    assert f"scale(s) reads them with mask_folder=[{tmp_path / 'out_200'}]):\n    {command}\n" in err, err
    assert main(command.split()[3:]) == 0 and (tmp_path / "out_200" / "nested" / "r.npy.zst").is_file()
    params = json.loads((out / "fh_params.json").read_text())
    (out / "fh_params.json").write_text(json.dumps({**params, "decode": 99}))  # a newer rmae's masks
    assert main(["--images", str(tmp_path / "in"), "--out", str(out), "--scales", "100,300", "--sigma", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "holds masks made with the same FH recipe but a newer rmae's image decoding, 99, not this rmae's" in err, err
    (out / "fh_params.json").write_text(json.dumps({**params, "format": "uint8 [S, H, W] .npy", "extra": 1}))
    assert main(["--images", str(tmp_path / "in"), "--out", str(out), "--scales", "100,300", "--sigma", "0.5"]) == 2
    err = capsys.readouterr().err
    assert ("the same FH recipe but extra 1, format 'uint8 [S, H, W] .npy', not this rmae's (extra None, format "
            "'uint16 [S, H, W] .npy.zst')") in err, err
    assert main(["--images", str(tmp_path / "in"), "--out", str(out), "--scales", "200", "--overwrite"]) == 0
    assert load_labels(out / "nested" / "r.npy.zst").shape[0] == 1


def test_verify_regenerates_bad_masks(coco_tree, capsys):
    args = ["--dataset", "coco", "--split", "val2017", "--root", str(coco_tree)]
    main(args)
    masks = coco_tree / "coco" / "image" / "fh_val2017"
    broken = masks / "000000000003.npy.zst"
    broken.write_bytes(broken.read_bytes()[:40])
    wrong_shape = masks / "000000000001.npy.zst"
    save_labels(wrong_shape, np.zeros((3, 5, 5), np.uint16))
    main(args)  # a plain rerun trusts existing files
    assert load_labels(wrong_shape).shape == (3, 5, 5)
    main(args + ["--verify"])
    err = capsys.readouterr().err
    assert "000000000003" in err and "000000000001" in err
    source = coco_tree / "coco" / "image" / "val2017"
    np.testing.assert_array_equal(load_labels(broken), expected_masks(source / "000000000003.jpg"))
    np.testing.assert_array_equal(load_labels(wrong_shape), expected_masks(source / "000000000001.jpg"))


def test_missing_dataset_and_bad_arguments_are_explained(tmp_path, capsys):
    assert main(["--dataset", "coco", "--split", "train2017", "--root", str(tmp_path)]) == 2
    assert "error: image folder" in capsys.readouterr().err
    assert main(["--dataset", "coco", "--split", "train", "--root", str(tmp_path)]) == 2
    assert "error: --dataset coco has splits" in capsys.readouterr().err
    generic = ["--images", str(tmp_path), "--out", "x", "--scales"]
    for bad in (["--dataset", "coco"], ["--images", str(tmp_path)], [], generic + ["-5"], generic + ["inf"], generic + ["nan"]):
        with pytest.raises(SystemExit) as exit_info:
            main(bad)
        assert exit_info.value.code == 2
    capsys.readouterr()
    # an empty scale (500,,1000 read as 500,1000), masks written into the image folder: refused, named
    for bad, fragment in ((generic + ["500,,1000"], "none left empty), got '500,,1000'"),
                          (generic + ["500,"], "none left empty"),
                          (["--images", str(tmp_path), "--out", str(tmp_path)], f"is --images {tmp_path}"),
                          (["--images", str(tmp_path), "--out", str(tmp_path / "fh")], "is inside --images")):
        with pytest.raises(SystemExit) as exit_info:
            main(bad)
        assert exit_info.value.code == 2 and fragment in capsys.readouterr().err
    assert not (tmp_path / "fh").exists()


def test_mask_files_round_trip_uint16_and_read_the_original_format(tmp_path):
    labels = np.random.default_rng(0).integers(0, 60000, (3, 20, 30))
    save_labels(tmp_path / "a" / "x.npy.zst", labels)
    loaded = load_labels(tmp_path / "a" / "x.npy.zst")
    assert loaded.dtype == np.uint16
    np.testing.assert_array_equal(loaded, labels)
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "a" / "x.npy.zst").st_mode & 0o777 == 0o666 & ~umask  # as open() would make it
    original = (labels % 256).astype(np.uint8)  # the original's uint8 .npy (wrapped labels)
    np.save(tmp_path / "a" / "y.npy", original)
    np.testing.assert_array_equal(load_labels(tmp_path / "a" / "y.npy"), original)
    assert find_mask(tmp_path / "a", "y.jpg") == tmp_path / "a" / "y.npy"
    assert find_mask(tmp_path / "a", "x.jpg") == mask_path(tmp_path / "a", "x.jpg")
    assert find_mask(tmp_path / "a", "z.jpg") is None
    with pytest.raises(ValueError, match="65536 segments"):
        save_labels(tmp_path / "big.npy.zst", np.arange(70000).reshape(1, 70, 1000))
    assert not (tmp_path / "big.npy.zst").exists()
    (tmp_path / "bad.npy.zst").write_bytes(b"garbage")
    with pytest.raises(MaskError, match="bad.npy.zst"):
        load_labels(tmp_path / "bad.npy.zst")
    with pytest.raises(FileNotFoundError):
        load_labels(tmp_path / "missing.npy.zst")
    with pytest.raises(ValueError, match="labels must be >= 0"):  # (it spoke of 65536 segments)
        save_labels(tmp_path / "negative.npy.zst", -np.ones((2, 2), np.int32))
    # bytes without a name: named by their size in errors (not printed whole), zstd recognised by its magic
    with pytest.raises(MaskError, match=r"cannot read mask file <5000 bytes>: "):
        load_labels(b"x" * 5000)
    np.testing.assert_array_equal(load_labels((tmp_path / "a" / "x.npy.zst").read_bytes()), labels)
    # a frame without its content size (the zstd tool writing to a pipe) reads too
    npy = io.BytesIO()
    np.save(npy, labels.astype(np.uint16))
    piped = io.BytesIO()
    with zstandard.ZstdCompressor(write_content_size=False).stream_writer(piped, closefd=False) as writer:
        writer.write(npy.getvalue())
    (tmp_path / "piped.npy.zst").write_bytes(piped.getvalue())
    np.testing.assert_array_equal(load_labels(tmp_path / "piped.npy.zst"), labels)
    (tmp_path / "UPPER.NPY.ZST").write_bytes(piped.getvalue())  # the format is in the bytes, not the suffix's case
    np.testing.assert_array_equal(load_labels(tmp_path / "UPPER.NPY.ZST"), labels)
    (tmp_path / "empty.npy.zst").write_bytes(b"")
    with pytest.raises(MaskError, match=r"empty.npy.zst is empty \(0 bytes\)"):
        load_labels(tmp_path / "empty.npy.zst")


def test_image_modes_convert_to_rgb(tmp_path):
    rgb = photo("chelsea")
    gray = photo("camera")
    cases = {
        "gray.png": Image.fromarray(gray),
        "palette.png": Image.fromarray(rgb).convert("P"),
        "rgba.png": Image.fromarray(np.dstack([rgb, np.full(SMALL, 100, np.uint8)])),
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
        "gray16.png": Image.fromarray(gray.astype(np.uint16) * 257),
        "la.png": Image.fromarray(gray).convert("LA"),
        "bw.png": Image.fromarray(gray > 100),
    }
    for name, image in cases.items():
        image.save(tmp_path / name)
        decoded = load_rgb(tmp_path / name)
        assert decoded.dtype == np.uint8 and decoded.shape == (*SMALL, 3), name
    for name in cases:  # 8-bit modes: exactly Pillow's conversion, as the original and the data pipeline decode
        if name == "gray16.png":  # scaled to 8 bits (convert("RGB") would clip it to white)
            np.testing.assert_array_equal(load_rgb(tmp_path / name), np.repeat(gray[..., None], 3, 2))
            continue
        with Image.open(tmp_path / name) as image:
            np.testing.assert_array_equal(load_rgb(tmp_path / name), np.asarray(image.convert("RGB")))
    np.testing.assert_array_equal(load_rgb(tmp_path / "rgba.png"), rgb)
    np.testing.assert_array_equal(load_rgb((tmp_path / "gray.png").read_bytes()), np.repeat(gray[..., None], 3, 2))
    (tmp_path / "empty.jpg").write_bytes(b"")
    for bad, content in (("empty.jpg", True), ("missing.jpg", False)):
        with pytest.raises(ImageDecodeError, match=bad) as error:
            load_rgb(tmp_path / bad)
        assert error.value.content is content  # the file's fault, or the file system's


def test_only_content_errors_are_accepted_by_allow_bad_images(tmp_path, monkeypatch):
    """An I/O error (errno set) may pass: the image then trains without a mask, so it is no bad image to accept."""
    import errno

    from PIL import Image as PILImage

    images = tmp_path / "in"
    tiny(images / "a.png", 0)
    tiny(images / "b.png", 1)
    real_open = PILImage.open

    def flaky(path, *args, **kwargs):
        if str(path).endswith("b.png"):
            raise OSError(errno.EIO, "Input/output error")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(PILImage, "open", flaky)
    args = ["--images", str(images), "--out", str(tmp_path / "out"), "--scales", "10", "--workers", "1"]
    with pytest.raises(ImageDecodeError) as error:
        load_rgb(images / "b.png")
    assert not error.value.content
    assert main([*args, "--allow-bad-images"]) == 1


def tiny(path: Path, seed: int, size=(8, 10)) -> Path:
    """A small random RGB image at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


def test_an_overwrite_run_never_removes_other_mask_folders_masks(tmp_path, capsys):
    """--overwrite removes the masks of images no longer listed, never those of another mask folder: an --out that
    holds the image folder (and so its sibling mask folders) is refused, and a mask folder of its own inside --out
    (its recipe record or a run's lock) is left alone, as are the temporary files of a run writing into it."""
    for name in ("a", "b"):
        tiny(tmp_path / "setA" / f"{name}.png", 1)
        tiny(tmp_path / "setB" / f"{name}.png", 2)
    assert main(["--images", str(tmp_path / "setB"), "--out", str(tmp_path / "fh_setB")]) == 0
    with pytest.raises(SystemExit) as exit_info:  # the helper's case: every mask of fh_setB was deleted
        main(["--images", str(tmp_path / "setA"), "--out", str(tmp_path), "--overwrite", "--scales", "1000"])
    assert exit_info.value.code == 2 and "a folder that holds --images" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "fh_setB").glob("*.npy.zst")) == ["a.npy.zst", "b.npy.zst"]
    masks = tmp_path / "masks"
    assert main(["--images", str(tmp_path / "setB"), "--out", str(masks / "other")]) == 0
    in_flight = masks / "other" / ".a.npy.zst.123.tmp"
    in_flight.write_bytes(b"a write in progress")
    assert main(["--images", str(tmp_path / "setA"), "--out", str(masks)]) == 0
    assert main(["--images", str(tmp_path / "setA"), "--out", str(masks), "--overwrite", "--scales", "1000"]) == 0
    assert sorted(p.name for p in (masks / "other").glob("*.npy.zst")) == ["a.npy.zst", "b.npy.zst"]
    assert in_flight.exists() and load_labels(masks / "a.npy.zst").shape[0] == 1


def test_memory_gate_runs_segmentations_in_turn_within_the_budget():
    """Reservations beyond the budget wait, in the order they asked (a large one is not overtaken for ever by small
    ones that would fit); one larger than the whole budget is refused."""
    import threading

    gate = preprocess_module.MemoryGate(100)
    entered, release = [], {name: threading.Event() for name in "abc"}

    def job(name: str, nbytes: int) -> None:
        with gate.reserve(nbytes, name):
            entered.append(name)
            release[name].wait(10)

    threads = {}
    for name, nbytes in (("a", 60), ("b", 60), ("c", 30)):
        threads[name] = threading.Thread(target=job, args=(name, nbytes))
        threads[name].start()
        time.sleep(0.2)
    assert entered == ["a"]  # b does not fit beside a; c would, but b asked first
    release["a"].set()
    threads["a"].join(10)
    time.sleep(0.2)
    assert entered == ["a", "b", "c"]  # 60 + 30 fit together
    for name in "bc":
        release[name].set()
        threads[name].join(10)
    with pytest.raises(preprocess_module.ImageTooLargeError, match=r"big needs about 0 MiB to segment, more than"):
        with gate.reserve(101, "big"):
            pass
    with preprocess_module.MemoryGate(None).reserve(10**15, "anything"):  # memory unknown: no limit
        pass


def test_an_image_too_large_for_the_memory_is_a_failure_not_the_end_of_the_run(tmp_path, monkeypatch, capsys):
    """An image whose segmentation alone would need more memory than the machine has (a small PNG of 13000x13000
    pixels needs about 54 GB) is listed as a failure before it is decoded; the others are segmented."""
    tiny(tmp_path / "images" / "small.png", 1)
    tiny(tmp_path / "images" / "large.png", 2, size=(100, 120))
    monkeypatch.setattr(preprocess_module, "available_memory", lambda: 2 * 10**6)  # 1.7 MB for FH; large needs 3.8
    assert main(["--images", str(tmp_path / "images"), "--out", str(tmp_path / "fh")]) == 1
    err = capsys.readouterr().err
    assert re.search(r"failed \S*large\.png: ImageTooLargeError: \S*large\.png \(120x100 pixels, 3 FH scale\(s\)\) "
                     r"needs about 4 MiB to segment, more than the 2 MiB this run may use", err), err
    assert (tmp_path / "fh" / "small.npy.zst").exists() and not (tmp_path / "fh" / "large.npy.zst").exists()
    assert "large.png" in (tmp_path / "fh" / "preprocess_failures.tsv").read_text()


def test_a_damaged_image_that_claims_a_huge_size_is_a_bad_image(tmp_path, monkeypatch, capsys):
    """A truncated file whose header claims more pixels than the run may segment is decoded first (its pixels alone
    fit): it fails as the bad image it is, which --allow-bad-images excuses, not as too large; Pillow's
    decompression-bomb warning stays off the console (the memory gate decides)."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    images = tmp_path / "images"
    tiny(images / "small.png", 1)
    header = (9500).to_bytes(4, "big") + (9500).to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])  # 90 MP RGB
    (images / "huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                                      + chunk(b"IDAT", zlib.compress(bytes(5000))))  # then it ends
    monkeypatch.setattr(preprocess_module, "available_memory", lambda: 4 * 10**9)  # FH: 31 GB; decoding: 1.4 GB
    assert main(["--images", str(images), "--out", str(tmp_path / "fh"), "--allow-bad-images"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"failed \S*huge\.png: cannot decode", err) and "TooLarge" not in err, err
    assert "DecompressionBombWarning" not in err
    assert (tmp_path / "fh" / "small.npy.zst").exists()


def test_a_second_ctrl_c_waits_for_the_images_being_written(tmp_path):
    """Two Ctrl-Cs in quick succession (as `timeout -s INT` sends: to the process, then to its group): the second
    is noted, not acted on, so no worker is abandoned between its temporary file and the rename. It was acted on:
    of six such runs, one left a temporary file, others died by the signal (-2), aborted in C++ or printed a
    traceback. Each run exits 130 with its message and leaves no temporary file."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(300):  # small: masks are written many times a second, so a write is often under way
        Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(images / f"{i:03d}.png")
    for trial, gap in enumerate([0.001, 0.005, 0.001, 0.005]):
        out = tmp_path / f"masks{trial}"
        command = [sys.executable, "-m", "rmae.preprocess", "--images", str(images), "--out", str(out),
                   "--workers", "2"]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while time.time() < deadline and len(list(out.glob("*.npy.zst"))) < 20:
            time.sleep(0.005)
        process.send_signal(signal.SIGINT)
        time.sleep(gap)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
        assert process.returncode == 130, err
        assert "interrupted: the masks written so far are kept" in err, err
        assert "Traceback" not in err and "terminate called" not in err, err
        assert not list(out.glob(".*.tmp"))


def test_main_called_from_python_gives_the_signal_handlers_back_after_a_stop(tmp_path, monkeypatch, capsys):
    """main() stopped by a Ctrl-C returns 130 and puts the caller's handlers back (a script or a notebook that calls
    it keeps its Ctrl-C); only the command line's process, which is ending, ignores later signals."""
    tiny(tmp_path / "images" / "a.png", 1)

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # (the handler runs here)

    monkeypatch.setattr(preprocess_module, "preprocess", interrupted)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    assert main(["--images", str(tmp_path / "images"), "--out", str(tmp_path / "fh")]) == 130
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert "interrupted: the masks written so far are kept" in capsys.readouterr().err


def test_masks_without_a_recipe_record_of_another_scale_count_are_refused(tmp_path, capsys):
    """Masks copied without their folder's recipe record: another number of scales would count as done for this
    recipe (and be written down as it), so the run is refused; the same number is used, with a note."""
    for name in ("a", "b"):
        tiny(tmp_path / "images" / f"{name}.png", 3)
    assert main(["--images", str(tmp_path / "images"), "--out", str(tmp_path / "one"), "--scales", "300"]) == 0
    for copy in ("copy", "copy3"):
        (tmp_path / copy).mkdir()
    for mask in (tmp_path / "one").glob("*.npy.zst"):
        (tmp_path / "copy" / mask.name).write_bytes(mask.read_bytes())
        (tmp_path / "copy3" / mask.name).write_bytes(mask.read_bytes())
    capsys.readouterr()
    assert main(["--images", str(tmp_path / "images"), "--out", str(tmp_path / "copy")]) == 2
    assert re.search(r"copy holds masks but no record of their FH recipe \(fh_params\.json\), and \S*\.npy\.zst has 1 "
                     r"scale\(s\), not the 3 of FH scales 500,1000,1500", capsys.readouterr().err)
    assert not (tmp_path / "copy" / "fh_params.json").exists()
    assert main(["--images", str(tmp_path / "images"), "--out", str(tmp_path / "copy"), "--scales", "700"]) == 0
    assert "note: " in capsys.readouterr().err and load_labels(tmp_path / "copy" / "a.npy.zst").shape[0] == 1
    # --overwrite recomputes such masks: the 1-scale copies become the 3-scale recipe's, which is then recorded
    assert main(["--images", str(tmp_path / "images"), "--out", str(tmp_path / "copy3"), "--overwrite"]) == 0
    assert all(load_labels(tmp_path / "copy3" / f"{name}.npy.zst").shape[0] == 3 for name in ("a", "b"))
    assert json.loads((tmp_path / "copy3" / "fh_params.json").read_text())["scales"] == [500.0, 1000.0, 1500.0]


def test_killed_overwrite_is_resumed_and_its_old_masks_never_count_as_done(tmp_path, monkeypatch, capsys):
    from rmae.data import DataConfig, MaskRecipeError, build_dataset

    images = tmp_path / "in"
    for i in range(4):
        tiny(images / f"{i}.png", i)
    out = tmp_path / "out"
    generic = ["--images", str(images), "--out", str(out), "--workers", "1"]
    assert main(generic + ["--scales", "1"]) == 0  # recipe A
    (images / "2.png").write_bytes(b"no longer an image")
    (images / "3.png").unlink()  # an image removed before the change of recipe: A's mask of it must not stay
    real_segment = preprocess_module._segment_one

    def killed_at_second_image(image_file, mask_file, recipe):
        if image_file.name == "1.png":
            raise KeyboardInterrupt  # as if the run were killed here
        real_segment(image_file, mask_file, recipe)

    monkeypatch.setattr(preprocess_module, "_segment_one", killed_at_second_image)
    assert main(generic + ["--scales", "300", "--overwrite"]) == 130  # recipe B, unfinished
    assert "interrupted: the masks written so far are kept" in capsys.readouterr().err
    monkeypatch.setattr(preprocess_module, "_segment_one", real_segment)
    assert main(generic + ["--scales", "50"]) == 2
    assert "did not finish" in capsys.readouterr().err
    # the loader refuses the mix of A's and B's masks, and names the command that finishes B
    with pytest.raises(MaskRecipeError, match=r"an --overwrite run to it \(FH recipe scales 300, .*did not finish"
                       ) as unfinished:
        build_dataset(DataConfig(dataset="coco", image_folder=str(images), mask_folder=str(out), root=str(tmp_path)))
    finish = str(unfinished.value).splitlines()[-1].split()
    assert finish[:3] == ["python", "-m", "rmae.preprocess"] and "--overwrite" not in finish
    assert (out / "3.npy.zst").is_file()  # A's, of the removed image
    assert main(finish[3:] + ["--workers", "1"]) == 1  # resumes B; 2.png fails
    for i in range(2):
        np.testing.assert_array_equal(load_labels(out / f"{i}.npy.zst")[0], fh.felzenszwalb(load_rgb(images / f"{i}.png"), 300, 0.8, 300))
    assert not (out / "2.npy.zst").exists()  # recipe A's mask of an image that got none from B is gone
    assert not (out / "3.npy.zst").exists()  # nor of the image no longer there (taken as done if it came back)
    assert "redo_started_ns" not in (out / "fh_params.json").read_text()  # the redo is complete


def test_verify_keeps_a_mask_whose_image_cannot_be_read_now(tmp_path, monkeypatch, capsys):
    """--verify with an image the file system refuses (permissions, I/O): a failure, and its mask stays (it was
    deleted as 'bad', and could not be made again)."""
    import errno

    images, out = tmp_path / "in", tmp_path / "out"
    tiny(images / "a.png", 0)
    generic = ["--images", str(images), "--out", str(out), "--workers", "1", "--scales", "10"]
    assert main(generic) == 0
    real_open = preprocess_module.Image.open

    def refused(path, *args, **kwargs):
        if Path(path).name == "a.png":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(preprocess_module.Image, "open", refused)
    assert main(generic + ["--verify"]) == 1
    assert "Permission denied" in capsys.readouterr().err
    assert (out / "a.npy.zst").is_file()


def test_a_second_run_into_the_same_mask_folder_is_refused(tmp_path, capsys):
    """Two runs into one folder deleted each other's files in flight and failures lists: the second waits."""
    import fcntl

    images, out = tmp_path / "in", tmp_path / "out"
    tiny(images / "a.png", 0)
    out.mkdir()
    with open(out / ".preprocess.lock", "a") as held:  # a run in progress
        fcntl.flock(held, fcntl.LOCK_EX)
        assert main(["--images", str(images), "--out", str(out), "--workers", "1", "--scales", "10"]) == 2
        assert f"another rmae.preprocess run is writing into {out}" in capsys.readouterr().err
        assert not (out / "a.npy.zst").exists()
    assert main(["--images", str(images), "--out", str(out), "--workers", "1", "--scales", "10"]) == 0


def test_symlinked_folders_are_followed_and_broken_links_reported(tmp_path):
    tiny(tmp_path / "elsewhere" / "n01" / "a.png", 0)
    images = tmp_path / "train"
    tiny(images / "n02" / "b.png", 1)
    (images / "n01").symlink_to(tmp_path / "elsewhere" / "n01", target_is_directory=True)
    (images / "n02" / "loop").symlink_to(images, target_is_directory=True)  # must not recurse for ever
    (images / "n02" / "c.png").symlink_to(tmp_path / "gone.png")
    (images / "n02" / "d.png").symlink_to(images / "n02" / "d.png")  # links that loop: an error, not a folder
    (images / "n02" / "x").symlink_to(images / "n02" / "x")  # (they stopped the whole listing)
    out = tmp_path / "out"
    assert list_images(images) == [Path("n01/a.png"), Path("n02/b.png")]
    assert main(["--images", str(images), "--out", str(out), "--workers", "1", "--scales", "10"]) == 1
    assert (out / "n01" / "a.npy.zst").is_file() and (out / "n02" / "b.npy.zst").is_file()
    failures = (out / "preprocess_failures.tsv").read_text()
    why = "broken symbolic link (its target does not exist or cannot be reached)"
    assert failures == f"{images / 'n02' / 'c.png'}\t{why}\n{images / 'n02' / 'd.png'}\t{why}\n"
    # an annotation file may still list a broken link (training then stops there): not a bad image to accept
    assert main(["--images", str(images), "--out", str(out), "--scales", "10", "--allow-bad-images"]) == 1


def test_images_sharing_a_mask_file_are_failures(tmp_path, capsys):
    images = tmp_path / "in"
    for i, name in enumerate(["x.jpg", "x.png", "y.jpg", "y.JPG", "z.png"]):
        tiny(images / name, i)
    out = tmp_path / "out"
    assert main(["--images", str(images), "--out", str(out), "--workers", "1", "--scales", "10"]) == 1
    assert sorted(p.name for p in out.glob("*.npy.zst")) == ["z.npy.zst"]
    failures = (out / "preprocess_failures.tsv").read_text().splitlines()
    assert [line.split("\t")[0].rsplit("/", 1)[1] for line in failures] == ["x.jpg", "x.png", "y.JPG", "y.jpg"]
    assert "same mask file x.npy.zst as x.png" in failures[0]
    err = capsys.readouterr().err  # on the console too, as the images that cannot be decoded
    assert f"failed {images / 'x.jpg'}: same mask file x.npy.zst as x.png" in err, err
    assert "--allow-bad-images" not in err
    # training cannot do without them (they have no mask): still a failed run with --allow-bad-images
    assert main(["--images", str(images), "--out", str(out), "--scales", "10", "--allow-bad-images"]) == 1


def test_mask_files_carry_a_checksum_and_older_files_still_load(tmp_path):
    labels = np.arange(600).reshape(1, 20, 30) % 7
    save_labels(tmp_path / "a.npy.zst", labels)
    good = (tmp_path / "a.npy.zst").read_bytes()
    assert zstandard.get_frame_parameters(good).has_checksum
    (tmp_path / "b.npy.zst").write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # content checksum is the last 4 bytes
    with pytest.raises(MaskError, match="b.npy.zst"):
        load_labels(tmp_path / "b.npy.zst")
    buffer = io.BytesIO()
    np.save(buffer, labels.astype(np.uint16))
    (tmp_path / "old.npy.zst").write_bytes(zstandard.ZstdCompressor(level=3).compress(buffer.getvalue()))
    np.testing.assert_array_equal(load_labels(tmp_path / "old.npy.zst"), labels)


def test_other_per_image_errors_are_failures_and_long_names_fit(tmp_path, monkeypatch):
    images = tmp_path / "in"
    long_name = "a" * 240 + ".png"  # a 248-byte mask name: fits, and so must its temp file
    for i, name in enumerate([long_name, "b.png", "c.png"]):
        tiny(images / name, i)
    real_load = preprocess_module.load_rgb

    def out_of_memory_on_b(path):
        if path.name == "b.png":
            raise MemoryError("cannot allocate")
        return real_load(path)

    monkeypatch.setattr(preprocess_module, "load_rgb", out_of_memory_on_b)
    out = tmp_path / "out"
    assert main(["--images", str(images), "--out", str(out), "--workers", "1", "--scales", "10"]) == 1
    assert (out / ("a" * 240 + ".npy.zst")).is_file() and (out / "c.npy.zst").is_file()
    assert (out / "preprocess_failures.tsv").read_text() == f"{images / 'b.png'}\tMemoryError: cannot allocate\n"


def test_failures_with_non_utf8_names_are_written_as_their_bytes(tmp_path, capsys):
    images = tmp_path / "in"
    tiny(images / "ok.png", 0)
    (images / os.fsdecode(b"caf\xe9.png")).write_bytes(b"not an image")
    out = tmp_path / os.fsdecode(b"out\xff")
    assert main(["--images", str(images), "--out", str(out), "--workers", "1", "--scales", "10"]) == 1
    failures = (out / "preprocess_failures.tsv").read_bytes()
    assert failures.startswith(os.fsencode(images) + b"/caf\xe9.png\t")
    assert not (out / "preprocess_failures.tsv.tmp").exists()
    assert "1 failed" in capsys.readouterr().out


def test_saving_masks_leaves_the_umask_alone(tmp_path, monkeypatch):
    previous = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", lambda mask: pytest.fail("save_labels changed the process umask"))
        save_labels(tmp_path / "cls" / "x.npy.zst", np.zeros((1, 2, 2), np.uint16))
    finally:
        monkeypatch.undo()
        os.umask(previous)
    assert oct((tmp_path / "cls" / "x.npy.zst").stat().st_mode & 0o777) == oct(0o640)


def test_imagenet_folder_falls_back_to_imnet_per_split(tmp_path):
    tiny(tmp_path / "imagenet" / "val" / "n01" / "v.png", 0)
    tiny(tmp_path / "imnet" / "train" / "n01" / "t.png", 1)
    assert main(["--dataset", "imnet", "--split", "train", "--root", str(tmp_path), "--workers", "1"]) == 0
    assert (tmp_path / "imnet" / "fh_train" / "n01" / "t.npy.zst").is_file()


def test_preprocessing_and_the_loader_list_the_same_images(tmp_path):
    """Every image the loader can read gets a mask, and no mask is made for a file the loader skips."""
    from rmae.data.sources import _list_images

    pixels = np.zeros((4, 4, 3), np.uint8)
    for name in ("a.jpg", "b.gif", "c.PNG", "d.webp", ".hidden.jpg", "notes.txt", "cls/e.tiff", "cls/f.bmp"):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".txt"):
            path.write_text("not an image")
        else:
            Image.fromarray(pixels).save(path, format={"jpg": "JPEG", "tiff": "TIFF"}.get(
                path.suffix[1:].lower(), path.suffix[1:].upper()))
    by_preprocessing = [str(p) for p in list_images(tmp_path)]
    assert by_preprocessing == _list_images(tmp_path)
    assert by_preprocessing == ["a.jpg", "b.gif", "c.PNG", "cls/e.tiff", "cls/f.bmp", "d.webp"]


def test_loader_and_preprocessing_agree_below_the_first_level(tmp_path):
    """Symlinked folders deep in the tree are followed, broken links and links back up are not listed by the
    loader, and a file name that is not valid UTF-8 is listed by both."""
    from rmae.data.sources import _list_images

    pixels = np.zeros((4, 4, 3), np.uint8)
    odd = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: not valid UTF-8
    for name in ("n01/a.png", "extra/b.png", f"n01/{odd}"):
        (tmp_path / "train" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(tmp_path / "train" / name)
    (tmp_path / "train" / "n01" / "more").symlink_to(tmp_path / "train" / "extra", target_is_directory=True)
    (tmp_path / "train" / "n01" / "loop").symlink_to(tmp_path / "train", target_is_directory=True)
    (tmp_path / "train" / "n01" / "broken.png").symlink_to(tmp_path / "nowhere.png")
    images = ["extra/b.png", "n01/a.png", f"n01/{odd}", "n01/more/b.png"]
    assert [str(p) for p in list_images(tmp_path / "train")] == images
    assert _list_images(tmp_path / "train") == images
    assert _list_images(tmp_path / "train", num_threads=1) == images
    assert main(["--images", str(tmp_path / "train"), "--out", str(tmp_path / "masks"), "--workers", "1"]) == 1
    assert sorted(str(p.relative_to(tmp_path / "masks")) for p in (tmp_path / "masks").rglob("*.npy.zst")) == [
        "extra/b.npy.zst", "n01/a.npy.zst", "n01/" + odd.replace(".png", ".npy.zst"), "n01/more/b.npy.zst"]


def test_the_loader_reports_folders_it_cannot_list(tmp_path, monkeypatch):
    from rmae import listing
    from rmae.data.sources import _list_images

    for name in ("n01/a.png", "n02/b.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / name)
    real_scandir = os.scandir

    def scandir(path):
        if str(path).endswith("n02"):
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(listing.os, "scandir", scandir)
    with pytest.warns(UserWarning, match=r"1 folder\(s\) under .* cannot be listed.*n02: cannot list folder \(Permission denied\)"):
        assert _list_images(tmp_path) == ["n01/a.png"]


def test_unwritable_mask_folder_is_an_error_not_a_traceback(tmp_path, capsys, monkeypatch):
    tiny(tmp_path / "in" / "a.png", 0)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit) as exit_info:  # --out is a file
        main(["--images", str(tmp_path / "in"), "--out", str(tmp_path / "afile")])
    assert exit_info.value.code == 2 and "not a folder" in capsys.readouterr().err
    # dataset mode: the mask folder's name is taken by a file (as a read-only tree, it cannot be made)
    tiny(tmp_path / "coco" / "image" / "val2017" / "1.jpg", 1)
    (tmp_path / "coco" / "image" / "fh_val2017").write_text("x")
    assert main(["--dataset", "coco", "--split", "val2017", "--root", str(tmp_path)]) == 2
    assert "error:" in capsys.readouterr().err
    # a folder that exists but cannot be written (os.access as on a read-only mount; root bypasses chmod)
    out = tmp_path / "out"
    assert main(["--images", str(tmp_path / "in"), "--out", str(out)]) == 0
    tiny(tmp_path / "in" / "b.png", 2)
    monkeypatch.setattr(preprocess_module.os, "access", lambda path, mode: False)
    assert main(["--images", str(tmp_path / "in"), "--out", str(out)]) == 2
    assert "not writable" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(["--images", str(tmp_path / "in"), "--out", str(out)]) == 0  # nothing new to write: fine


def test_failures_file_that_cannot_be_written_still_reports(tmp_path, capsys):
    tiny(tmp_path / "in" / "a.png", 0)
    (tmp_path / "in" / "bad.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    (out / "preprocess_failures.tsv.tmp").mkdir(parents=True)  # the write fails: a folder is in the way
    assert main(["--images", str(tmp_path / "in"), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "cannot write" in captured.err and "bad.png" in captured.err
    assert "1 written" in captured.out and "1 failed" in captured.out and "listed in" not in captured.out


def test_failures_file_writes_leave_nothing_behind_and_a_read_only_folder_is_fine(tmp_path, monkeypatch, capsys):
    """A failures list whose write fails half way (a full disk) leaves no temporary file; a run without failures in
    a read-only folder, which refuses even the removal of a file that is not there, says nothing."""
    listed = tmp_path / "preprocess_failures.tsv"

    def full_disk(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(preprocess_module.os, "replace", full_disk)
    assert not preprocess_module._write_failures(listed, [("a.png", "bad")])
    assert "cannot write" in capsys.readouterr().err and not list(tmp_path.iterdir())
    monkeypatch.undo()

    def read_only(self, missing_ok=False):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "unlink", read_only)
    assert preprocess_module._write_failures(listed, []) and capsys.readouterr().err == ""


def test_verify_does_not_decompress_a_mask_far_larger_than_its_image(tmp_path, capsys):
    """A foreign file that decompresses to gigabytes (65 KB of zstd can hold 2 GB) is judged from its recorded size,
    or read no further than a mask of its image could be, and remade; the loader's reads are unbounded as before."""
    tiny(tmp_path / "in" / "a.png", 0)
    tiny(tmp_path / "in" / "b.png", 1)
    out = tmp_path / "out"
    assert main(["--images", str(tmp_path / "in"), "--out", str(out)]) == 0
    header = b"\x93NUMPY\x01\x00v\x00{'descr': '<u2', 'fortran_order': False, 'shape': (3, 4000, 4000), }"
    bomb = header.ljust(128 - 1) + b"\n" + bytes(10**6)  # 1 MB of zeros standing for gigabytes
    (out / "a.npy.zst").write_bytes(zstandard.ZstdCompressor().compress(bomb))
    (out / "b.npy.zst").write_bytes(zstandard.ZstdCompressor(write_content_size=False).compress(bomb))
    capsys.readouterr()
    assert main(["--images", str(tmp_path / "in"), "--out", str(out), "--verify"]) == 0
    err = capsys.readouterr().err
    assert err.count("holds more than 4576 bytes, more than a mask of its image") == 2, err
    for name in ("a", "b"):
        np.testing.assert_array_equal(load_labels(out / f"{name}.npy.zst"), expected_masks(tmp_path / "in" / f"{name}.png"))


def test_a_full_disk_stops_the_run_instead_of_failing_every_image(tmp_path, monkeypatch, capsys):
    """Once a mask cannot be written for lack of space, every later one would fail the same way after its
    segmentation: the run stops (exit 2), keeping the masks written, and says what to do."""
    for i in range(8):
        tiny(tmp_path / "in" / f"{i}.png", i)
    segment_one, calls = preprocess_module._segment_one, []

    def until_full(image_file, mask_file, recipe):
        calls.append(image_file)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        segment_one(image_file, mask_file, recipe)

    monkeypatch.setattr(preprocess_module, "_segment_one", until_full)
    assert main(["--images", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--workers", "1"]) == 2
    assert re.search(r"error: the disk holding \S*out is full: the masks written so far are kept; free some space "
                     r"and run the same command again", capsys.readouterr().err)
    assert len(calls) == 3 and len(list((tmp_path / "out").glob("*.npy.zst"))) == 2
    monkeypatch.undo()
    assert main(["--images", str(tmp_path / "in"), "--out", str(tmp_path / "out")]) == 0
    assert len(list((tmp_path / "out").glob("*.npy.zst"))) == 8


@pytest.mark.parametrize("content", ['{"scales": [500.0', "[]", "\xff"])
def test_damaged_recipe_file_is_a_clear_error(tmp_path, content, capsys):
    tiny(tmp_path / "in" / "a.png", 0)
    out = tmp_path / "out"
    assert main(["--images", str(tmp_path / "in"), "--out", str(out)]) == 0
    (out / "fh_params.json").write_bytes(content.encode("latin-1"))
    assert main(["--images", str(tmp_path / "in"), "--out", str(out)]) == 2
    assert re.search(r"fh_params\.json cannot be read.*\n.*--overwrite", capsys.readouterr().err)
    assert main(["--images", str(tmp_path / "in"), "--out", str(out), "--overwrite"]) == 0


def test_verify_runs_in_the_pool_and_counts(coco_tree, capsys):
    args = ["--dataset", "coco", "--split", "val2017", "--root", str(coco_tree), "--workers", "2"]
    main(args)
    masks = coco_tree / "coco" / "image" / "fh_val2017"
    save_labels(masks / "000000000002.npy.zst", np.zeros((3, 5, 5), np.uint16))
    capsys.readouterr()
    assert main(args + ["--verify"]) == 1  # the two undecodable files still fail
    out = capsys.readouterr().out
    assert "7 images: 0 written, 4 already done (verified), 1 regenerated, 2 failed" in out  # the categories add up


def test_options_that_would_be_ignored_are_refused(tmp_path, capsys):
    tiny(tmp_path / "in" / "a.png", 0)
    generic = ["--images", str(tmp_path / "in"), "--out", str(tmp_path / "out")]
    for bad in (["--scales", ""], ["--min-sizes", ","], ["--split", "val2017"], ["--root", str(tmp_path)],
                ["--sigma", "1e308"], ["--sigma", "1e12"]):
        with pytest.raises(SystemExit) as exit_info:
            main(generic + bad)
        assert exit_info.value.code == 2, bad
    assert "sigma 1e+12 is too large: its Gaussian kernel" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_failure_lines_escape_tabs_and_line_breaks(tmp_path):
    tiny(tmp_path / "in" / "a.png", 0)
    (tmp_path / "in" / "bad\tname\nx.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    assert main(["--images", str(tmp_path / "in"), "--out", str(out)]) == 1
    (line,) = (out / "preprocess_failures.tsv").read_text().splitlines()
    path, reason = line.split("\t")
    assert path.endswith("bad\\tname\\nx.jpg") and reason


def test_jobs_are_queued_a_few_at_a_time():
    from concurrent.futures import ThreadPoolExecutor

    pulled, finished, most = [0], [0], [0]

    def jobs():
        for i in range(50):
            pulled[0] += 1
            most[0] = max(most[0], pulled[0] - finished[0])
            yield i

    def done():
        finished[0] += 1

    with ThreadPoolExecutor(2) as pool:
        preprocess_module._run_bounded(pool, lambda job: time.sleep(0.001), jobs(), limit=4, on_done=done)
    assert finished[0] == 50 and most[0] <= 5


def test_masks_of_wide_images_from_an_older_decoding_are_made_again(tmp_path, capsys):
    """Up to DECODE_VERSION 1 (folders without the key) a 16-bit image was clipped to white before FH: in such
    a folder its mask is made again from the scaled pixels; 8-bit images' masks are kept; the folder is then
    recorded as the current decoding (no header scan on later runs)."""
    images, out = tmp_path / "in", tmp_path / "out"
    images.mkdir()
    gray = photo("camera")
    Image.fromarray(gray.astype(np.uint16) * 257).save(images / "wide.png")
    Image.fromarray(photo("chelsea")).save(images / "rgb.png")
    args = ["--images", str(images), "--out", str(out), "--workers", "1", "--scales", "100"]
    assert main(args) == 0
    fresh = load_labels(out / "wide.npy.zst")
    assert np.array_equal(fresh, expected_masks(images / "wide.png", scales=(100,)))
    # the folder as an older version left it: the mask of the clipped (white) image, no "decode" key
    save_labels(out / "wide.npy.zst", np.zeros((1, *SMALL), np.uint16))
    params = json.loads((out / "fh_params.json").read_text())
    del params["decode"]
    (out / "fh_params.json").write_text(json.dumps(params))
    rgb_mtime = (out / "rgb.npy.zst").stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    assert np.array_equal(load_labels(out / "wide.npy.zst"), fresh)
    assert (out / "rgb.npy.zst").stat().st_mtime_ns == rgb_mtime
    assert "regenerating" in capsys.readouterr().err
    assert json.loads((out / "fh_params.json").read_text())["decode"] == 2
    # a folder of a newer decoding is another recipe: refused, saying so
    (out / "fh_params.json").write_text(json.dumps({**params, "decode": 3}))
    assert main(args) == 2
    assert "a newer rmae's image decoding, 3, not this rmae's (decoding 2" in capsys.readouterr().err


def test_an_older_read_only_mask_folder_is_still_used(tmp_path, capsys, monkeypatch):
    """A shared, read-only folder of the older decoding without wide images: nothing to remake, and the
    decoding version that cannot be recorded is a note, not a failed run."""
    import rmae.preprocess as pre

    images, out = tmp_path / "in", tmp_path / "out"
    tiny(images / "a.png", 0)
    args = ["--images", str(images), "--out", str(out), "--workers", "1", "--scales", "10"]
    assert main(args) == 0
    params = json.loads((out / "fh_params.json").read_text())
    del params["decode"]
    (out / "fh_params.json").write_text(json.dumps(params))

    def read_only(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(pre, "_write_params", read_only)
    capsys.readouterr()
    for extra in ([], ["--verify"]):
        assert main(args + extra) == 0
        err = capsys.readouterr().err
        assert "note: cannot record the current image decoding" in err and "Permission denied" in err


def test_commands_run_from_the_folder_that_holds_a_clone_named_rmae(tmp_path):
    """There ``rmae`` is first found as a folder without ``__init__.py`` (a namespace package) and the editable
    install supplies the modules: no module may need a name defined in ``rmae/__init__.py``."""
    (tmp_path / "rmae").mkdir()
    (tmp_path / "rmae" / "README.md").write_text("a clone\n")
    tiny(tmp_path / "imgs" / "a.png", 0)
    code = ("import rmae.fh, rmae.kernels, rmae.models, rmae.data, rmae.train, rmae.export, rmae.preprocess\n"
            "from rmae.preprocess import main\n"
            "raise SystemExit(main(['--images', 'imgs', '--out', 'fh', '--scales', '10', '--workers', '1']))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "fh" / "a.npy.zst").is_file()
