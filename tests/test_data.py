"""Dataset readers, crops and crop banks on tiny synthetic files."""

from __future__ import annotations

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from conftest import require_data
from PIL import Image

from vaezip.errors import InputError
from vaezip.training import bank, data


def _idx_bytes(array: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape) + array.tobytes()


@pytest.fixture
def rng():
    return np.random.default_rng(1)


def test_idx_gz_and_plain(tmp_path, rng):
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    gz = tmp_path / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gzip.compress(_idx_bytes(images)))
    plain = tmp_path / "t10k-images-idx3-ubyte"
    plain.write_bytes(_idx_bytes(images))
    for path in (gz, plain):
        loaded = data.load_dataset(str(path), limit=None, channels=1)
        assert len(loaded) == 5 and loaded[0].shape == (28, 28, 1) and loaded[0].dtype == np.uint8
        np.testing.assert_array_equal(np.stack(loaded)[..., 0], images)
    assert len(data.load_dataset(str(gz), limit=2, channels=1)) == 2
    rgb = data.load_dataset(str(gz), limit=1, channels=3)[0]
    assert rgb.shape == (28, 28, 3) and (rgb == images[0][..., None]).all()


def test_idx_rejects_labels_and_truncation(tmp_path):
    labels = tmp_path / "train-labels-idx1-ubyte"
    labels.write_bytes(_idx_bytes(np.arange(10, dtype=np.uint8)))
    with pytest.raises(InputError):
        data.load_dataset(str(labels), None, 1)
    short = tmp_path / "short-idx3-ubyte"
    short.write_bytes(_idx_bytes(np.zeros((2, 4, 4), np.uint8))[:-3])
    with pytest.raises(InputError):
        data.load_dataset(str(short), None, 1)


def test_npz_key_selection_and_npy(tmp_path, rng):
    test_x = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    train_x = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    path = tmp_path / "set.npz"
    np.savez(path, test_x=test_x, train_x=train_x, test_y=np.arange(3))
    np.testing.assert_array_equal(np.stack(data.load_dataset(str(path), None, 3)), test_x)
    np.testing.assert_array_equal(np.stack(data.load_dataset(f"{path}:train_x", None, 3)), train_x)
    with pytest.raises(InputError):
        data.load_dataset(f"{path}:nope", None, 3)
    with pytest.raises(InputError):
        data.load_dataset(f"{path}:test_y", None, 3)  # not uint8 images
    only = tmp_path / "only.npz"
    np.savez(only, anything=train_x[..., :1])
    assert data.load_dataset(str(only), None, 1)[0].shape == (32, 32, 1)
    npy = tmp_path / "gray.npy"
    np.save(npy, train_x[..., 0])
    assert data.load_dataset(str(npy), 2, 1)[1].shape == (32, 32, 1)


def _cifar_batch(rng, n=4):
    return {b"batch_label": b"testing batch", b"labels": list(range(n)),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar_batch(tmp_path, rng, protocol):
    batch = _cifar_batch(rng)
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(batch, protocol=protocol))
    images = data.load_dataset(str(path), None, 3)
    assert len(images) == 4 and images[0].shape == (32, 32, 3)
    # CHW rows: the first 1024 bytes are the red plane, row-major
    np.testing.assert_array_equal(images[2][..., 0].ravel(), batch[b"data"][2, :1024])
    np.testing.assert_array_equal(images[2][..., 2].ravel(), batch[b"data"][2, 2048:])
    # a folder of batches reads all data_batch_* in order
    (tmp_path / "data_batch_2").write_bytes(pickle.dumps(_cifar_batch(rng, 2), protocol=protocol))
    assert len(data.load_dataset(str(tmp_path), None, 3)) == 6


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_cifar_refuses_arbitrary_pickles(tmp_path):
    marker = str(tmp_path / "pwned")
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps({b"data": _Evil(marker)}))
    with pytest.raises(InputError):
        data.load_dataset(str(path), None, 3)
    assert not os.path.exists(marker)
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8)}))
    with pytest.raises(InputError):
        data.load_dataset(str(path), None, 3)


def test_folder_recursive_sorted_and_gray(tmp_path, rng):
    arrays = [rng.integers(0, 256, (10 + i, 12, 3), dtype=np.uint8) for i in range(3)]
    (tmp_path / "sub").mkdir()
    Image.fromarray(arrays[0]).save(tmp_path / "b.png")
    Image.fromarray(arrays[1]).save(tmp_path / "a.png")
    Image.fromarray(arrays[2]).save(tmp_path / "sub" / "c.png")
    (tmp_path / "notes.txt").write_text("not an image")
    images = data.load_dataset(str(tmp_path), None, 3)
    assert [im.shape[0] for im in images] == [11, 10, 12]  # a.png, b.png, sub/c.png
    gray = data.load_dataset(str(tmp_path), None, 1)
    expected = np.asarray(Image.fromarray(arrays[1]).convert("L"))
    np.testing.assert_array_equal(gray[0][..., 0], expected)
    np.testing.assert_array_equal(data.to_channels(arrays[1], 1)[..., 0], expected)  # same luma as Pillow
    single = data.load_dataset(str(tmp_path / "a.png"), None, 3)
    np.testing.assert_array_equal(single[0], arrays[1])
    reduced = data.load_dataset(str(tmp_path / "a.png") + "@2", None, 3)[0]
    np.testing.assert_array_equal(reduced, np.asarray(Image.fromarray(arrays[1]).reduce(2)))
    with pytest.raises(InputError):
        data.load_dataset(str(tmp_path / "missing"), None, 3)


def test_random_crops_shapes_padding_and_state(rng):
    photos = [rng.integers(0, 256, (40, 50, 3), dtype=np.uint8), rng.integers(0, 256, (20, 10, 3), dtype=np.uint8)]
    sampler = data.RandomCrops(photos, 32, seed=3)
    x = sampler.sample(6)
    assert x.shape == (6, 3, 32, 32) and x.dtype == torch.uint8
    state = sampler.state
    a = sampler.sample_numpy(5)
    sampler.state = state
    np.testing.assert_array_equal(a, sampler.sample_numpy(5))
    np.testing.assert_array_equal(data.RandomCrops(photos, 32, seed=3).sample_numpy(6), x.numpy().transpose(0, 2, 3, 1))
    # a 20x10 image is edge-padded at the bottom/right to 32x32
    padded = sampler.images[1]
    assert padded.shape == (32, 32, 3)
    assert (padded[20:] == padded[19:20]).all() and (padded[:, 10:] == padded[:, 9:10]).all()
    flipped = sampler.crop_at(0, 0, 0, True)
    np.testing.assert_array_equal(flipped, photos[0][:32, :32][:, ::-1])
    assert data.RandomCrops(photos, 16, downscale=2).images[0].shape == (20, 25, 3)


def test_pad_small_images_to_multiple_of_16():
    mnist = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28, 1)
    padded = data.pad_to_multiple(mnist, 16)
    assert padded.shape == (32, 32, 1)
    np.testing.assert_array_equal(padded[:28, :28], mnist)
    assert (padded[28:, :28] == mnist[27:28]).all()
    assert data.pad_to_multiple(np.zeros((32, 48, 3), np.uint8), 16).shape == (32, 48, 3)


def test_crop_bank_round_trip(tmp_path, rng):
    photos = [rng.integers(0, 256, (40, 50, 3), dtype=np.uint8) for _ in range(3)]
    bank = data.build_crop_bank(photos, 16, per_image=4, seed=0)
    assert bank.shape == (12, 16, 16, 3) and bank.dtype == np.uint8
    np.testing.assert_array_equal(bank, data.build_crop_bank(photos, 16, per_image=4, seed=0))
    assert data.build_crop_bank(photos, 16, per_image=2, seed=0, area_weighted=True).shape == (6, 16, 16, 3)
    path = data.save_crop_bank(tmp_path / "bank", bank, "test bank")
    assert path.name == "bank.npz"
    for spec in (f"{path}:crops", str(path)):
        np.testing.assert_array_equal(np.stack(data.load_dataset(spec, None, 3)), bank)


def test_default_sources_never_kodak():
    require_data("wikiphotos")
    sources = data.default_photo_sources()
    assert all("kodak" not in str(s.folder).lower() for s in sources)
    held = data.heldout_wikiphotos()
    assert [p.name for p in held] == [f"{i:03d}.png" for i in range(41, 50)]
    wiki = [s for s in sources if s.folder.name == "wikiphotos"][0]
    assert set(wiki.exclude) == {p.name for p in held}
    assert all(s.downscale == 2 for s in sources if "bsds500" in str(s.folder))
    assert data.is_evaluation_only(str(data.data_root() / "kodak"))
    assert data.is_evaluation_only(str(data.data_root() / "kodak" / "kodim01.png") + "@2")
    assert not data.is_evaluation_only("photos")


def _is_window(crop: np.ndarray, image: np.ndarray) -> bool:
    """True when crop (S, S, C) is a window of image, as it is or flipped left-right."""
    s = crop.shape[0]
    for candidate in (crop, crop[:, ::-1]):
        for top in range(image.shape[0] - s + 1):
            for left in range(image.shape[1] - s + 1):
                if np.array_equal(image[top : top + s, left : left + s], candidate):
                    return True
    return False


def test_tensor_crops_cut_windows_and_restore_state(rng):
    photos = [rng.integers(0, 256, (20, 26, 3), dtype=np.uint8), rng.integers(0, 256, (9, 14, 3), dtype=np.uint8)]
    sampler = data.TensorCrops(photos, 12, seed=5)
    x = sampler.sample(16)
    assert x.shape == (16, 3, 12, 12) and x.dtype == torch.uint8
    assert x.is_contiguous(memory_format=torch.channels_last)
    padded = data.RandomCrops(photos, 12).images  # the 9x14 photo is edge-padded to 12x14
    for crop in x.permute(0, 2, 3, 1).numpy():
        assert any(_is_window(crop, im) for im in padded)
    assert sampler.sample(200).float().flip(-1).ne(sampler.sample(200).float()).any()
    state = sampler.state
    a = sampler.sample(7)
    sampler.state = state
    assert torch.equal(a, sampler.sample(7))
    assert torch.equal(data.TensorCrops(photos, 12, seed=5).sample(16), x)
    assert not torch.equal(data.TensorCrops(photos, 12, seed=6).sample(16), x)


def test_photos2_validation_split():
    require_data("photos2")
    names = data.photos2_validation()
    assert 50 < len(names) < 110 and all(n.endswith(".webp") for n in names)
    recipe = bank.gen2_bank_recipe()
    trained = {p.name for part in recipe.parts for p in part.source.paths() if "photos2" in str(part.source.folder)}
    assert trained and not trained & set(names)
    assert all("kodak" not in str(part.source.folder) for part in recipe.parts)
    assert all("049.png" in part.source.exclude for part in recipe.parts if part.source.folder.name == "wikiphotos")
