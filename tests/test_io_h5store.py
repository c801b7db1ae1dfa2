"""Tests of bestie.io.h5store: round trips, atomic appearance, error messages."""

from __future__ import annotations

import signal
import textwrap

import h5py
import numpy as np
import pytest

from bestie.errors import ArtifactError
from bestie.io.h5store import H5Reader, H5Writer, decode_id, encode_id
from process_util import sigkill_mid_write

ODD_IDS = [
    "2007_000032",
    "a/b/c",
    "/leading/slash/",
    "100%",
    "%2F",
    "%25 literal",
    ".",
    "..",
    "with space",
    "ünï/cødé",
    "back\\slash",
    "tab\tand\nnewline",
    "000000391895",
]


def _arrays(rng: np.random.Generator, k: int) -> dict[str, np.ndarray]:
    return {
        "cams": rng.random((k, 40, 50)).astype(np.float16),  # 4000 B x k: compressed for k >= 2
        "classes": rng.choice(20, size=k, replace=False).astype(np.int16),
        "points": rng.random((k + 1, 4)).astype(np.float32),
        "mask": rng.random((30, 31)) > 0.5,
        "wsss": rng.integers(0, 256, size=(60, 70), dtype=np.uint8),
    }


@pytest.mark.parametrize("image_id", ODD_IDS)
def test_encode_id_reversible_and_flat(image_id):
    name = encode_id(image_id)
    assert "/" not in name and name not in (".", "..")
    assert decode_id(name) == image_id


def test_encode_id_rejects_bad_ids():
    with pytest.raises(ValueError):
        encode_id("")
    with pytest.raises(TypeError):
        encode_id(17)


def test_round_trip_odd_ids(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "cams.h5"
    expected = {}
    file_attrs = {"stage": "cam", "scales": [1.0, 0.5, 1.5], "nested": {"a": 1, "b": None}, "n": np.int64(3)}
    with H5Writer(path, attrs=file_attrs) as w:
        for k, image_id in enumerate(ODD_IDS):
            arrays = _arrays(rng, k % 4 + 1)
            w.write(image_id, **arrays)
            w.set_attrs(image_id, image_size=(375, 500 + k), name=image_id, flag=True)
            expected[image_id] = arrays
        w.write("empty", points=np.zeros((0, 4), np.float32), scalar=np.float32(2.5))
        assert len(w) == len(ODD_IDS) + 1 and "a/b/c" in w
    with H5Reader(path) as r:
        assert r.ids() == ODD_IDS + ["empty"]
        assert list(r) == r.ids()
        assert len(r) == len(ODD_IDS) + 1
        assert "a/b/c" in r and "a%2Fb%2Fc" not in r and "missing" not in r
        assert r.file_attrs == {"stage": "cam", "scales": [1.0, 0.5, 1.5], "nested": {"a": 1, "b": None}, "n": 3}
        for k, image_id in enumerate(ODD_IDS):
            got = r.read(image_id)
            assert sorted(got) == sorted(expected[image_id])
            for name, arr in expected[image_id].items():
                assert got[name].dtype == arr.dtype and got[name].shape == arr.shape, (image_id, name)
                np.testing.assert_array_equal(got[name], arr)
            np.testing.assert_array_equal(r.read_array(image_id, "classes"), expected[image_id]["classes"])
            attrs = r.attrs(image_id)
            np.testing.assert_array_equal(attrs["image_size"], [375, 500 + k])
            assert attrs["name"] == image_id and attrs["flag"] is True
        empty = r.read("empty")
        assert empty["points"].shape == (0, 4) and empty["points"].dtype == np.float32
        assert empty["scalar"] == np.float32(2.5)
        assert r.attrs("empty") == {}
        assert [i for i, _ in r.items()] == r.ids()


def test_empty_store(tmp_path):
    with H5Writer(tmp_path / "e.h5", attrs={"k": "v"}):
        pass
    with H5Reader(tmp_path / "e.h5") as r:
        assert r.ids() == [] and len(r) == 0 and r.file_attrs == {"k": "v"}


def test_big_arrays_compressed_small_not(tmp_path):
    path = tmp_path / "s.h5"
    with H5Writer(path) as w:
        w.write("x", big=np.zeros((100, 100), np.float32), small=np.zeros(10, np.int16))
    with h5py.File(path, "r") as f:
        group = f["images"]["x"]
        assert group["big"].compression == "gzip" and group["big"].chunks is not None
        assert group["small"].compression is None and group["small"].chunks is None
    with H5Writer(path, compression=None) as w:
        w.write("x", big=np.zeros((100, 100), np.float32))
    with h5py.File(path, "r") as f:
        assert f["images"]["x"]["big"].compression is None


def test_incremental_write_and_duplicate_name(tmp_path):
    with H5Writer(tmp_path / "s.h5") as w:
        w.write("a", cams=np.ones((1, 2, 2), np.float16))
        w.write("a", classes=np.array([3], np.int16))
        with pytest.raises(ValueError, match="already written"):
            w.write("a", classes=np.array([4], np.int16))
        with pytest.raises(ValueError, match="object dtype"):
            w.write("b", bad=np.array([object()]))
    with H5Reader(tmp_path / "s.h5") as r:
        assert r.ids() == ["a", "b"]
        assert r.read("a")["classes"].tolist() == [3]


def test_file_appears_only_on_clean_close(tmp_path):
    path = tmp_path / "out.h5"
    with H5Writer(path) as w:
        w.write("a", x=np.arange(5))
        assert not path.exists()
    assert path.exists()
    with H5Reader(path) as r:
        before = r.read("a")["x"].tolist()
    with pytest.raises(RuntimeError, match="stage failed"):
        with H5Writer(path) as w:
            w.write("a", x=np.arange(7))
            w.write("b", x=np.arange(3))
            raise RuntimeError("stage failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5"]
    with H5Reader(path) as r:
        assert r.ids() == ["a"] and r.read("a")["x"].tolist() == before


def test_failed_first_write_creates_nothing(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with H5Writer(tmp_path / "new.h5") as w:
            w.write("a", x=np.arange(5))
            1 / 0
    assert list(tmp_path.iterdir()) == []


def test_write_outside_with_is_an_error(tmp_path):
    w = H5Writer(tmp_path / "x.h5")
    with pytest.raises(RuntimeError, match="with"):
        w.write("a", x=np.zeros(2))


def test_reader_errors_name_file_and_id(tmp_path):
    missing = tmp_path / "nope.h5"
    with pytest.raises(ArtifactError, match="nope.h5"):
        H5Reader(missing)
    text = tmp_path / "text.h5"
    text.write_text("this is not HDF5\n" * 100)
    with pytest.raises(ArtifactError, match="text.h5"):
        H5Reader(text)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["data"] = np.arange(3)
    with pytest.raises(ArtifactError, match="foreign.h5.*not a bestie"):
        H5Reader(foreign)
    good = tmp_path / "good.h5"
    with H5Writer(good) as w:
        w.write("img 1", x=np.random.default_rng(0).random((200, 200)))
    r = H5Reader(good)  # also usable without `with`
    with pytest.raises(KeyError) as info:
        r.read("img 2")
    assert "img 2" in str(info.value) and "good.h5" in str(info.value)
    with pytest.raises(KeyError, match="'y'"):
        r.read_array("img 1", "y")
    r.close()
    r.close()  # idempotent
    # truncated copy of a valid store: corrupt
    data = good.read_bytes()
    trunc = tmp_path / "trunc.h5"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="trunc.h5"):
        with H5Reader(trunc) as rt:
            rt.read("img 1")


_SLOW_H5 = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from bestie.io.h5store import H5Writer
    rng = np.random.default_rng(1)
    with H5Writer(sys.argv[1], compression=None) as w:
        for i in range(100000):
            w.write(f"img/{i}", cams=rng.random((4, 64, 64)).astype(np.float16))
            w._file.flush()
            time.sleep(0.005)
    """
)


def test_sigkill_mid_write_keeps_previous_store(tmp_path):
    path = tmp_path / "cams.h5"
    cams = np.random.default_rng(5).random((2, 8, 8)).astype(np.float16)
    with H5Writer(path, attrs={"run": 1}) as w:
        w.write("old", cams=cams)
    proc = sigkill_mid_write(_SLOW_H5, path, min_bytes=200_000, timeout_s=60)
    assert proc.returncode == -signal.SIGKILL
    with H5Reader(path) as r:
        assert r.ids() == ["old"] and r.file_attrs == {"run": 1}
        np.testing.assert_array_equal(r.read_array("old", "cams"), cams)
