"""Pixel fidelity and clean data errors (issue R, part 2).

12-bit data in 16-bit PNGs (with and without sBIT) read at their real depth; palette / RGBA /
LA / I / I;16 / 16-bit colour files; tiny and huge images warn; a corrupt file is found before
training with the file named and a fix that works; a missing file says so."""

from __future__ import annotations

import struct
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medscalpel.data import Preprocess, open_dataset
from medscalpel.data import io as pio
from medscalpel.data.io import png_header, read_image, read_image_info, scale_samples
from medscalpel.data.scan import (ImageScan, readable_image_files, require_readable, scan_files,
                                  split_file_query)
from medscalpel.errors import ConfigError, DataError

sys.path.insert(0, str(Path(__file__).parent))
from test_executors import save_tiny_model, write_csv_dataset  # noqa: E402

PP = Preprocess(size=32)


# ----------------------------------------------------------------------------- helpers
def grey8(size: int = 40, seed: int = 0) -> np.ndarray:
    """A smooth 8-bit grey image using the full range (0 and 255 both present)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    img = 0.6 * xx + 0.3 * np.sin(6 * yy) ** 2 + 0.1 * rng.random((size, size))
    img = (img - img.min()) / (img.max() - img.min())
    return np.round(img * 255).astype(np.uint8)


def to12(a8: np.ndarray) -> np.ndarray:
    return np.round(a8.astype(np.float64) * 4095 / 255).astype(np.uint16)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def with_sbit(png: bytes, *bits: int) -> bytes:
    """The PNG with an sBIT chunk inserted right after IHDR (8 + 25 bytes)."""
    return png[:33] + _chunk(b"sBIT", bytes(bits)) + png[33:]


def png_bytes(img: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def raw_png16(arr: np.ndarray, colour_type: int, sbit: tuple[int, ...] = ()) -> bytes:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit RGB/RGBA/LA)."""
    h, w = arr.shape[:2]
    rows = b"".join(b"\x00" + arr[i].astype(">u2").tobytes() for i in range(h))
    out = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type,
                                                              0, 0, 0))
    if sbit:
        out += _chunk(b"sBIT", bytes(sbit))
    return out + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b"")


def unit(arr: np.ndarray) -> np.ndarray:
    return arr.astype(np.float64) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float64)


@pytest.fixture()
def pngs(tmp_path):
    """The 8-bit original and its 12-bit copies in 16-bit PNGs (no sBIT, sBIT=12, and sBIT=12
    with the samples scaled up to 16 bits as the PNG spec prescribes)."""
    a8 = grey8()
    a12 = to12(a8)
    files = {"8bit": tmp_path / "orig8.png", "12": tmp_path / "raw12.png",
             "12sbit": tmp_path / "sbit12.png", "12scaled": tmp_path / "scaled12.png"}
    Image.fromarray(a8).save(files["8bit"])
    Image.fromarray(a12).save(files["12"])
    files["12sbit"].write_bytes(with_sbit(png_bytes(Image.fromarray(a12)), 12))
    scaled = (a12.astype(np.uint32) << 4 | a12.astype(np.uint32) >> 8).astype(np.uint16)
    files["12scaled"].write_bytes(with_sbit(png_bytes(Image.fromarray(scaled)), 12))
    return a8, files


# ----------------------------------------------------------------------------- bit depth
def test_12bit_in_16bit_png_reads_like_its_8bit_original(pngs):
    a8, files = pngs
    ref, ref_info = read_image_info(files["8bit"])
    assert ref.dtype == np.uint8 and ref_info.label == "8 bits (file)"
    expected = {"12": (12, "range"), "12sbit": (12, "sBIT"),
                "12scaled": (12, "sBIT, scaled samples")}
    for key, (bits, source) in expected.items():
        arr, info = read_image_info(files[key])
        assert (info.bits, info.source, info.container_bits) == (bits, source, 16), key
        assert arr.dtype == np.float32 and arr.shape == a8.shape
        assert np.abs(unit(arr) - unit(ref)).max() <= 1 / 255, key
        # the old reader divided by 65535: the brightest pixel reached 16 of 255
        assert arr.max() == pytest.approx(1.0, abs=1e-3)
        # after the model's preprocessing (resize + normalisation) too
        diff = (PP(arr) - PP(ref)).abs().max().item() * PP.std[0]
        assert diff <= 1 / 255, key


def test_sbit_keeps_a_dark_12bit_image_dark(tmp_path):
    """Without sBIT a 12-bit image whose maximum is under 1024 is read as 10-bit (stretched x4,
    the documented limit of the range rule); sBIT states the depth and keeps it dark."""
    dark = (grey8().astype(np.uint16) * 3)  # max 765 of 4095
    Image.fromarray(dark).save(tmp_path / "dark.png")
    (tmp_path / "dark_sbit.png").write_bytes(with_sbit(png_bytes(Image.fromarray(dark)), 12))
    a, info = read_image_info(tmp_path / "dark.png")
    b, info_s = read_image_info(tmp_path / "dark_sbit.png")
    assert (info.bits, info.source) == (10, "range")
    assert (info_s.bits, info_s.source) == (12, "sBIT")
    assert b.max() == pytest.approx(765 / 4095, abs=1e-6)
    assert a.max() == pytest.approx(765 / 1023, abs=1e-6)


def test_sbit_contradicted_by_the_data_falls_back_to_the_range():
    a = np.array([[0, 70000]], np.int64)
    out, bits, source, top = scale_samples(a, 32, sbit=12)
    assert (bits, source, top) == (17, "range, sBIT contradicted", 70000)
    assert out.max() == pytest.approx(70000 / (2**17 - 1))


def test_png_header_parses_sbit_of_each_colour_type():
    base = b"\x89PNG\r\n\x1a\n"
    for ctype, sbit, want in [(0, (12,), 12), (2, (10, 12, 11), 12), (4, (12, 16), 12),
                              (6, (9, 10, 11, 16), 11), (3, (5, 6, 5), 6)]:
        data = (base + _chunk(b"IHDR", struct.pack(">IIBBBBB", 3, 2, 16 if ctype != 3 else 8,
                                                   ctype, 0, 0, 0))
                + _chunk(b"sBIT", bytes(sbit)) + _chunk(b"IDAT", b"x"))
        hdr = png_header(data)
        assert (hdr["width"], hdr["height"], hdr["colour_type"], hdr["sbit"]) == (3, 2, ctype, want)
    no_sbit = base + _chunk(b"IHDR", struct.pack(">IIBBBBB", 3, 2, 16, 0, 0, 0, 0))
    assert png_header(no_sbit + _chunk(b"IDAT", b"") + _chunk(b"sBIT", b"\x0c"))["sbit"] is None
    assert png_header(b"\xff\xd8\xff\xe0 a jpeg") is None


def test_uint16_arrays_are_scaled_by_their_real_depth():
    a8 = grey8()
    t12 = PP.to_tensor01(to12(a8))
    t8 = PP.to_tensor01(a8)
    assert (t12 - t8).abs().max().item() <= 1 / 255
    full = PP.to_tensor01(np.array([[0, 65535]], np.uint16))
    assert full.max().item() == pytest.approx(1.0)


def test_predictions_on_12bit_png_equal_those_on_the_8bit_original(pngs, tmp_path):
    """A tiny model's probabilities on the 12-bit copies equal those on the 8-bit original
    within 1e-2 (through predict_spec: image file -> model preprocessing -> sigmoid)."""
    from medscalpel.engine.api import predict_spec

    _, files = pngs
    spec = write_csv_dataset(tmp_path / "data", n=8)
    model = save_tiny_model(spec, tmp_path / "model")
    probs = {k: predict_spec(model, str(p), split=None).probs() for k, p in files.items()}
    for key in ("12", "12sbit", "12scaled"):
        assert np.abs(probs[key] - probs["8bit"]).max() <= 1e-2, key
    # the old reading (12-bit values / 65535, i.e. an almost black image) would differ
    from medscalpel.models.checkpoint import load_model

    m = load_model(model).eval()
    with torch.no_grad():
        old = torch.sigmoid(m(PP(to12(grey8()).astype(np.float32) / 65535.0)[None])).numpy()
    assert np.abs(old - probs["8bit"]).max() > np.abs(probs["12"] - probs["8bit"]).max()


# ----------------------------------------------------------------------------- modes
def test_palette_rgba_la_i_and_16bit_colour_modes(tmp_path):
    g = grey8(seed=3)
    alpha = np.random.default_rng(1).integers(0, 256, g.shape).astype(np.uint8)
    pal = Image.fromarray(g, "L").convert("P")  # Pillow's L -> P keeps a grey palette
    pal.save(tmp_path / "pal.png")
    Image.fromarray(np.stack([g, g, g, alpha], -1), "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.stack([g, alpha], -1), "LA").save(tmp_path / "la.png")
    Image.fromarray(np.stack([g] * 3, -1), "RGB").save(tmp_path / "rgb.jpg", quality=100)
    Image.fromarray(to12(g).astype(np.int32), "I").save(tmp_path / "i32.tif")
    Image.fromarray(to12(g)).save(tmp_path / "i16.tif")
    Image.fromarray(g.astype(np.float32) / 255, "F").save(tmp_path / "f01.tif")
    Image.fromarray(to12(g).astype(np.float32), "F").save(tmp_path / "f12.tif")
    g12 = to12(g)
    (tmp_path / "rgb16.png").write_bytes(raw_png16(np.stack([g12] * 3, -1), 2))
    rgba16 = np.stack([g12] * 3 + [np.full_like(g12, 65535)], -1)
    (tmp_path / "rgba16.png").write_bytes(raw_png16(rgba16, 6, sbit=(12, 12, 12, 16)))
    (tmp_path / "la16.png").write_bytes(raw_png16(np.stack([g12, np.full_like(g12, 7)], -1), 4))
    for name, mode in [("pal.png", "P"), ("rgba.png", "RGBA"), ("la.png", "LA"),
                       ("i32.tif", "I"), ("i16.tif", "I;16"), ("f01.tif", "F"),
                       ("f12.tif", "F"), ("rgb16.png", "RGB"),
                       ("rgba16.png", "RGBA"), ("la16.png", "RGBA"), ("rgb.jpg", "RGB")]:
        arr, info = read_image_info(tmp_path / name)
        assert arr.ndim == 2 and arr.shape == g.shape, name
        assert info.mode == mode, (name, info.mode)
        tol = 3 / 255 if name.endswith(".jpg") else 1 / 255
        assert np.abs(unit(arr) - unit(g)).max() <= tol, name
    assert read_image_info(tmp_path / "rgba16.png")[1].source == "sBIT"
    assert read_image_info(tmp_path / "f12.tif")[1].bits == 12
    # colour=True keeps three channels, in RGB order, for a 16-bit colour PNG too
    col = np.stack([g12, g12 // 2, g12 // 4], -1)
    (tmp_path / "col16.png").write_bytes(raw_png16(col, 2, sbit=(12, 12, 12)))
    c = read_image(tmp_path / "col16.png", colour=True)
    assert c.shape == (*g.shape, 3) and c[..., 0].max() > c[..., 1].max() > c[..., 2].max()


def test_nih_sample_rgb_and_rgba_files_read_as_grey():
    root = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "nih14-sample64"
    if not root.is_dir():
        pytest.skip("needs ../shared/data/nih14-sample64 (real NIH images; absent here)")
    modes = {}
    for p in sorted((root / "images").glob("*.png"))[:400]:
        arr, info = read_image_info(p)
        modes.setdefault(info.mode, (p, arr))
        assert arr.dtype == np.uint8 and arr.shape == (64, 64)
    assert {"RGB", "RGBA"} <= set(modes)
    p, arr = modes["RGBA"]
    rgb = np.asarray(Image.open(p).convert("RGB"), np.float32)
    assert np.abs(rgb[..., 0] - rgb[..., 1]).max() == 0  # grey content
    assert np.array_equal(arr, rgb[..., 0].astype(np.uint8))


# ----------------------------------------------------------------------------- sizes
def test_tiny_image_warns_naming_the_file(tmp_path):
    Image.fromarray(np.full((1, 1), 128, np.uint8)).save(tmp_path / "one_pixel.png")
    with pytest.warns(UserWarning, match=r"one_pixel\.png is only 1x1 pixels"):
        read_image(tmp_path / "one_pixel.png")
    Image.fromarray(grey8(16)).save(tmp_path / "ok16.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_image(tmp_path / "ok16.png")  # 16 px on a side is fine
    scan = scan_files([tmp_path / "one_pixel.png", tmp_path / "ok16.png"])
    assert scan.tiny == (f"{tmp_path / 'one_pixel.png'} (1x1)",) and scan.n_tiny == 1 and scan.ok


def test_huge_image_warns_and_a_decompression_bomb_is_refused(tmp_path, monkeypatch):
    Image.fromarray(grey8(40)).save(tmp_path / "big.png")
    monkeypatch.setattr(pio, "HUGE_PIXELS", 1000)
    with pytest.warns(UserWarning, match=r"big\.png is 40x40 .* downscale it first"):
        read_image(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1600 px > 2 x 100: Pillow refuses
    with pytest.raises(DataError, match=r"Cannot read image .*big\.png: DecompressionBombError"):
        read_image(tmp_path / "big.png")


# ----------------------------------------------------------------------------- corrupt files
def _folder(root: Path, n: int = 6) -> Path:
    for k, c in enumerate(("NORMAL", "PNEUMONIA")):
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.clip(grey8(24, seed=i) + 40 * k, 0, 255).astype(np.uint8)).save(
                root / c / f"{c.lower()}{i}.jpeg", quality=90)
    return root


def test_corrupt_file_is_found_before_training_and_skip_corrupt_works(tmp_path, monkeypatch):
    from medscalpel.engine import api
    from medscalpel.engine.train import TrainConfig

    root = _folder(tmp_path / "kermany")
    good = (root / "PNEUMONIA" / "pneumonia0.jpeg").read_bytes()
    (root / "PNEUMONIA" / "pneumonia0.jpeg").write_bytes(good[: len(good) // 2])  # truncated
    calls = []
    monkeypatch.setattr(api, "train", lambda *a, **k: calls.append(1) or 1 / 0)
    spec = f"folder:{root}?patient_regex=none"
    with pytest.raises(DataError, match=r"1 of 12 image file\(s\) of folder:.* cannot be read: "
                                        r"PNEUMONIA/pneumonia0\.jpeg: OSError: Truncated File "
                                        r"Read \(checked before any work started\)\. Replace or "
                                        r"remove .*'folder:.*\?patient_regex=none"
                                        r"&skip_corrupt=true'"):
        api.fit(spec, "resnet_tiny", tmp_path / "run", TrainConfig(epochs=1), size=16,
                progress=False)
    assert calls == []  # nothing trained
    monkeypatch.undo()
    # the advised fix works: the folder adapter skips the file, training runs
    cfg = TrainConfig(epochs=1, batch_size=4, device="cpu")
    res = api.fit(f"{spec}&skip_corrupt=true", "resnet_tiny", tmp_path / "run", cfg, size=16,
                  eval_split=None, progress=False)
    n = res.data["train"]["n_images"] + res.data["val"]["n_images"]  # no test split asked for
    assert res.data["pixels"]["n_files"] == n and res.data["pixels"]["unreadable"] == []
    assert res.data["pixels"]["bit_depths"] == {"8 bits (file)": n}
    assert res.data["train"]["pixels"]["scope"] == "train, val"
    assert res.data["train"]["skipped"]["count"] == 1


def test_scan_of_csv_dataset_names_the_file_and_a_fix_that_works(tmp_path):
    spec = write_csv_dataset(tmp_path / "data", n=8)
    (tmp_path / "data" / "img" / "005.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    ds = open_dataset(spec, split="all", preprocess=PP)
    with pytest.raises(DataError, match=r"img/005\.png: UnidentifiedImageError.*"
                                        r"'csv:.*labels\.csv\?split_col=split&skip_corrupt=true'"):
        require_readable(ds, progress=False)
    assert ds.meta["pixels"]["unreadable"][0]["id"] == "img/005.png"
    ok = open_dataset(spec + "&skip_corrupt=true", split="all", preprocess=PP)
    scan = require_readable(ok, progress=False)
    assert scan.n_files == 7 and scan.ok and ok.describe()["pixels"]["n_files"] == 7
    assert ImageScan.from_dict(scan.to_dict()) == scan
    assert require_readable(open_dataset("phantom?n=8&size=32", "all")) is None  # in memory
    (tmp_path / "x.dcm").write_bytes(b"not checked here: the DICOM adapter reads it")
    other = scan_files([tmp_path / "x.dcm", tmp_path / "data" / "img" / "000.png"])
    assert other.ok and other.bit_depths == {"not checked (.dcm: read by its adapter)": 1,
                                             "8 bits (file)": 1}


def test_scan_never_refuses_a_file_the_reader_can_read(tmp_path):
    """A PNG with a wrong CRC on a text chunk after its pixels fails Pillow's verify() but
    decodes: the scan confirms with the reader instead of refusing it."""
    png = png_bytes(Image.fromarray(grey8()))
    bad_crc = png[:-12] + _chunk(b"tEXt", b"a\0b")[:-4] + b"\0\0\0\0" + png[-12:]
    (tmp_path / "crc.png").write_bytes(bad_crc)
    with pytest.raises(SyntaxError, match="bad header checksum"):
        Image.open(tmp_path / "crc.png").verify()
    assert np.array_equal(read_image(tmp_path / "crc.png"), grey8())
    assert scan_files([tmp_path / "crc.png"]).ok


# ----------------------------------------------------------------------------- CLI messages
def test_predict_on_a_missing_file_says_it_does_not_exist(tmp_path, capsys, monkeypatch):
    from medscalpel.cli.main import run

    spec = write_csv_dataset(tmp_path / "data", n=8)
    model = save_tiny_model(spec, tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    for data in ("missing.png", "missing.png?skip_corrupt=true"):
        with pytest.raises(SystemExit) as ex:
            run(["predict", "--data", data, "--model", str(model), "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert ex.value.code == 2
        assert f"error: No such image file: 'missing.png' (looked in {tmp_path})" in err
        assert "Unknown dataset adapter" not in err
    assert not (tmp_path / "o").exists()


def test_predict_on_image_files_skip_corrupt_works(tmp_path, capsys):
    from medscalpel.cli.main import run

    spec = write_csv_dataset(tmp_path / "data", n=8)
    model = save_tiny_model(spec, tmp_path / "model")
    scans = tmp_path / "scans"
    scans.mkdir()
    for i in range(3):
        Image.fromarray(grey8(seed=i)).save(scans / f"s{i}.png")
    (scans / "s1.png").write_bytes((scans / "s1.png").read_bytes()[:60])
    for k, data in enumerate((str(scans), f"{scans}/*.png")):
        out_dir = tmp_path / f"out{k}"
        with pytest.raises(SystemExit) as ex:
            run(["predict", "--data", data, "--model", str(model), "--out", str(out_dir)])
        err = capsys.readouterr().err
        assert ex.value.code == 2 and "s1.png" in err and not out_dir.exists()
        assert f"'{data}?skip_corrupt=true'" in err  # the advised fix ...
        with pytest.raises(SystemExit) as ex:  # ... works
            run(["predict", "--data", f"{data}?skip_corrupt=true", "--model", str(model),
                 "--out", str(out_dir)])
        out = " ".join(capsys.readouterr().out.split())
        assert ex.value.code == 0
        assert "2 of 3 images" in out and "1 unreadable file(s) skipped" in out
    paths, skipped = readable_image_files([scans / "s0.png", scans / "s1.png"],
                                          f"{scans}?skip_corrupt=true")
    assert paths == [scans / "s0.png"] and skipped[0][0] == str(scans / "s1.png")
    with pytest.raises(DataError, match=r"s1\.png.*Replace or remove it\.$"):
        readable_image_files([scans / "s1.png"], str(scans / "s1.png"))


def test_split_file_query():
    assert split_file_query("a/*.png?skip_corrupt=false") == ("a/*.png", {"skip_corrupt": False})
    assert split_file_query("a/img?.png") == ("a/img?.png", {})
    with pytest.raises(ConfigError, match="Unknown option 'dedup' after the image path"):
        split_file_query("a/*.png?dedup=true")
    with pytest.raises(ConfigError, match="is true or false; got 'maybe'"):
        split_file_query("a/*.png?skip_corrupt=maybe")
