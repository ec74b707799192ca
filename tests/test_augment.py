"""Batched augmentation: each op against PIL on fixed images, weak_augment as an exact reflect-pad
crop (+ flip), strong_augment's dispatch, cutout, shapes, devices, independence and seeding."""

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps
from torch.utils._python_dispatch import TorchDispatchMode

import common
from common import (
    _OP,
    _RA_OPS,
    _affine,
    _autocontrast,
    _colour_op,
    _colour_op_no_sync,
    _equalize,
    _op_matrix,
    _posterize,
    _rand_augment,
    _solarize,
    strong_augment,
    weak_augment,
)


def _enhance(name):
    """One of the four ImageEnhance ops as strong_augment computes it: _colour_op with every image drawing it."""
    return lambda x, m: _colour_op(x, torch.full((len(x),), _OP[name], device=x.device), m)


_brightness, _color, _contrast, _sharpness = (_enhance(n) for n in ("brightness", "color", "contrast", "sharpness"))


def _images(channels=3, h=32, w=32):
    """Fixed test images: uniform noise (x2), a smooth gradient, low-contrast noise, and noise with
    a constant channel (autocontrast / equalize leave that channel alone)."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (2, channels, h, w), generator=g, dtype=torch.uint8)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    gradient = torch.stack([xx * 255, yy * 255, (xx + yy) * 127.5][:channels])
    gradient = gradient.round().to(torch.uint8)
    low = torch.randint(60, 140, (1, channels, h, w), generator=g, dtype=torch.uint8)
    flat = torch.randint(0, 256, (1, channels, h, w), generator=g, dtype=torch.uint8)
    flat[:, 0] = 77
    return torch.cat([noise, gradient[None], low, flat])


def _to_pil(t):
    a = t.permute(1, 2, 0).numpy()
    return Image.fromarray(a[..., 0] if a.shape[2] == 1 else a)


def _from_pil(img):
    a = np.asarray(img)
    return torch.from_numpy(a.reshape(a.shape[0], a.shape[1], -1).copy()).permute(2, 0, 1)


def _ours_and_pil(op, pil_op, magnitudes, channels=3, h=32, w=32):
    """Run `op` once on (every image x every magnitude), with per-image magnitudes, and `pil_op`
    image by image; returns both as int tensors."""
    images = _images(channels, h, w)
    x = images.repeat(len(magnitudes), 1, 1, 1)
    m = torch.tensor(magnitudes, dtype=torch.float32).repeat_interleave(len(images))
    ours = op(x, m)
    ref = torch.stack([_from_pil(pil_op(_to_pil(img), float(v))) for img, v in zip(x, m)])
    assert ours.dtype == torch.uint8 and ours.shape == x.shape
    return ours.int(), ref.int()


# --- colour ops ----------------------------------------------------------------------------------

FACTORS = [0.0, 0.05, 0.3, 0.5, 0.77, 0.95, 1.0, 1.6]  # TorchSSL's range is [0.05, 0.95]
ENHANCE = {
    "brightness": (_brightness, ImageEnhance.Brightness),
    "color": (_color, ImageEnhance.Color),
    "contrast": (_contrast, ImageEnhance.Contrast),
    "sharpness": (_sharpness, ImageEnhance.Sharpness),
}


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("name", list(ENHANCE))
def test_enhance_ops_match_pil_exactly(name, channels):
    # Same float32 blend and truncation as PIL's Image.blend, same degenerate images: exact.
    op, enhancer = ENHANCE[name]
    ours, ref = _ours_and_pil(op, lambda img, f: enhancer(img).enhance(f), FACTORS, channels)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("channels", [3, 1])
def test_lut_ops_match_pil_exactly(channels):
    bits = [1, 4, 4.5, 5, 6, 7, 7.99, 8]  # int(bits) as TorchSSL
    ours, ref = _ours_and_pil(_posterize, lambda img, b: ImageOps.posterize(img, int(b)), bits, channels)
    assert torch.equal(ours, ref)
    thresholds = [0, 0.5, 1, 100.5, 128, 200, 255, 256]
    ours, ref = _ours_and_pil(_solarize, ImageOps.solarize, thresholds, channels)
    assert torch.equal(ours, ref)
    ours, ref = _ours_and_pil(lambda x, _: _equalize(x), lambda img, _: ImageOps.equalize(img), [0], channels)
    assert torch.equal(ours, ref)
    # autocontrast: within one level, see test_autocontrast_is_exact_where_pil_rounds_down
    ours, ref = _ours_and_pil(lambda x, _: _autocontrast(x), lambda img, _: ImageOps.autocontrast(img), [0], channels)
    assert (ours - ref).abs().max() <= 1
    lo = _images(channels).amin((2, 3), keepdim=True).int()
    hi = _images(channels).amax((2, 3), keepdim=True).int()
    exact = torch.where(
        hi > lo, (_images(channels).int() - lo) * 255 // (hi - lo).clamp(min=1), _images(channels).int()
    )
    assert torch.equal(ours, exact)


def test_autocontrast_is_exact_where_pil_rounds_down():
    # PIL's LUT int(v * 255.0 / (hi - lo) - lo * 255.0 / (hi - lo)) in double gives 254 for v = hi
    # when hi - lo = 25 (254.99999...); ours is the exact floor(255 (v - lo) / (hi - lo)).
    x = torch.arange(26, dtype=torch.uint8).repeat(26).view(1, 1, 26, 26)
    ref = _from_pil(ImageOps.autocontrast(_to_pil(x[0]))).int()
    exact = (x.int() * 255) // 25
    assert torch.equal(_autocontrast(x).int(), exact)
    assert (exact - ref).abs().max() == 1 and ref.max() == 254


def test_autocontrast_divides_in_integers_for_every_range():
    """Every (lo, hi) range and every value in it: floor(255 (v - lo) / (hi - lo)) exactly, which the float32
    formula it replaced gives too (so the eager bytes did not change); and no floating division is run, since a
    compiler may approximate one (Triton's does: compiled, the float version was one level low on 96 % of the
    values of random images on an H200, bench/results/gpu_check_H200_profile.md)."""
    lo, hi = torch.triu_indices(256, 256, offset=1)  # every lo < hi
    v = lo.view(-1, 1) + torch.arange(256)  # each image's row: lo, lo + 1, ..., then hi repeated
    x = torch.minimum(v, hi.view(-1, 1)).to(torch.uint8).view(-1, 1, 1, 256)
    v = x.view(-1, 256).int()
    lo, hi = lo.view(-1, 1).int(), hi.view(-1, 1).int()
    exact = (v - lo) * 255 // (hi - lo)
    assert torch.equal(exact, ((v.float() - lo) * 255 / (hi - lo)).floor().int())
    divisions = []

    class Divisions(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket is torch.ops.aten.div and out.is_floating_point():
                divisions.append(func)
            return out

    with Divisions():
        ours = _autocontrast(x)
    assert torch.equal(ours.view(-1, 256).int(), exact) and divisions == []


# --- geometric ops -------------------------------------------------------------------------------

FILL = 128


def _pil_affine(data):
    return lambda img, v: img.transform(
        img.size, Image.AFFINE, data(img, v), resample=Image.BILINEAR, fillcolor=(FILL,) * len(img.getbands())
    )


def _pil_rotate(img, degrees):
    return img.rotate(degrees, resample=Image.BILINEAR, fillcolor=(FILL,) * len(img.getbands()))


def _geometric(name):
    """One geometric op's matrices as strong_augment builds them: _op_matrix with every image drawing it."""
    return lambda m, h, w: _op_matrix(torch.full(m.shape, _OP[name]), m, h, w)


GEOMETRIC = {
    "rotate": (_geometric("rotate"), _pil_rotate, [-30, -12.5, 0, 7, 30]),
    "shear_x": (_geometric("shear_x"), _pil_affine(lambda img, v: (1, v, 0, 0, 1, 0)), [-0.3, -0.1, 0.17, 0.3]),
    "shear_y": (_geometric("shear_y"), _pil_affine(lambda img, v: (1, 0, 0, v, 1, 0)), [-0.3, -0.1, 0.17, 0.3]),
    "translate_x": (  # TorchSSL: v * width
        _geometric("translate_x"),
        _pil_affine(lambda img, v: (1, 0, _f32_product(v, img.size[0]), 0, 1, 0)),
        [-0.3, -0.11, 0.05, 0.3],
    ),
    "translate_y": (  # TorchSSL: v * height
        _geometric("translate_y"),
        _pil_affine(lambda img, v: (1, 0, 0, 0, 1, _f32_product(v, img.size[1]))),
        [-0.3, -0.11, 0.05, 0.3],
    ),
}


def _f32_product(v, size):
    # The shift in pixels as our float32 code computes it: float32(0.05) * 40 is 2.0 in float32 but
    # 2.00000003 in double, which would make PIL blend in 3e-8 of the neighbour and truncate one
    # level lower on about half the pixels.
    return float(np.float32(v) * np.float32(size))


@pytest.mark.parametrize("channels,h,w", [(3, 32, 32), (1, 28, 28), (3, 24, 40), (3, 96, 96)])
@pytest.mark.parametrize("name", list(GEOMETRIC))
def test_geometric_ops_match_pil_bilinear(name, channels, h, w):
    # Same geometry, the same hard inside/fill test and edge-clamped neighbours as PIL, border
    # pixels included. One level off where the exact bilinear value is a whole number: PIL's double
    # arithmetic can land just below it and truncate one lower, ours adds a 0.01 margin.
    matrix, pil_op, magnitudes = GEOMETRIC[name]
    ours, ref = _ours_and_pil(lambda x, m: _affine(x, matrix(m, h, w), FILL), pil_op, magnitudes, channels, h, w)
    diff = (ours - ref).abs()
    assert diff.max() <= 1 and diff.float().mean() < 0.1


def test_rand_augment_composes_in_drawn_order():
    # Rotating by 90 degrees permutes the pixels of a square image, so applying PIL's ops one after
    # the other loses nothing and must equal our single composed warp: rotate then translate differs
    # from translate then rotate.
    x = _images()
    n = len(x)
    for first, second in [("rotate", "translate_x"), ("translate_x", "rotate")]:
        ops = torch.tensor([[_OP[first]] * n, [_OP[second]] * n])
        mags = torch.tensor([[90.0 if first == "rotate" else 0.25] * n, [90.0 if second == "rotate" else 0.25] * n])
        pil = {"rotate": GEOMETRIC["rotate"][1], "translate_x": GEOMETRIC["translate_x"][1]}
        ref = torch.stack(
            [_from_pil(pil[second](pil[first](_to_pil(img), float(mags[0, 0])), float(mags[1, 0]))) for img in x]
        )
        assert torch.equal(_rand_augment(x, ops, mags), ref)


def test_rand_augment_dispatches_every_op():
    # One slot, each image its own op: colour ops equal their function, geometric ops their warp,
    # identity returns the image.
    x = _images().repeat(len(_RA_OPS), 1, 1, 1)
    n, _, h, w = x.shape
    torch.manual_seed(0)
    ops = torch.arange(len(_RA_OPS)).repeat_interleave(n // len(_RA_OPS))
    low, high = torch.tensor(list(_RA_OPS.values())).float()[ops].unbind(-1)
    mags = low + (high - low) * torch.rand(n)
    out = _rand_augment(x, ops[None], mags[None])
    single = {
        "autocontrast": lambda x, m: _autocontrast(x),
        "equalize": lambda x, m: _equalize(x),
        "identity": lambda x, m: x,
        "brightness": _brightness,
        "color": _color,
        "contrast": _contrast,
        "sharpness": _sharpness,
        "posterize": _posterize,
        "solarize": _solarize,
    }
    single.update(
        {name: lambda x, m, matrix=GEOMETRIC[name][0]: _affine(x, matrix(m, h, w), FILL) for name in GEOMETRIC}
    )
    for name, code in _OP.items():
        i = ops == code
        assert torch.equal(out[i], single[name](x[i], mags[i])), name


@pytest.mark.parametrize("channels", [3, 1])
def test_the_cpu_path_of_a_colour_slot_equals_the_no_sync_path(channels):
    """On the CPU each image computes only the op it drew; on a GPU every op runs on every image and each image
    picks its own (no host sync). The two give the same bytes, for every op, identity and geometric included."""
    x = _images(channels).repeat(20, 1, 1, 1)
    g = torch.Generator().manual_seed(1)
    op = torch.randint(len(_RA_OPS), (len(x),), generator=g)
    low, high = torch.tensor(list(_RA_OPS.values())).float()[op].unbind(-1)
    magnitude = low + (high - low) * torch.rand(len(x), generator=g)
    assert set(op.tolist()) == set(range(len(_RA_OPS)))
    assert torch.equal(_colour_op(x, op, magnitude), _colour_op_no_sync(x, op, magnitude))


class _LaunchCount(TorchDispatchMode):
    """Counts the aten ops that would launch a kernel on a GPU (views launch none)."""

    launched = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.launched += not func.is_view
        return func(*args, **(kwargs or {}))


def test_the_no_sync_path_of_strong_augment_launches_at_most_400_ops(monkeypatch):
    """On a GPU, without --compile-augment, each op costs its launch: about 29 us of host time in eager mode (the
    H100 smoke run), a kernel in a CUDA graph. Counted here on the CPU, with the GPU's colour path. 528 before each
    slot's matrix was built in one piece and its grey image computed once (the geometric ops 165, the colour ops
    285); 377 since, and 374 since _autocontrast divides in integers. A count that depends on the batch size would be
    a Python loop over images."""
    monkeypatch.setattr(common, "_colour_op", _colour_op_no_sync)
    counts = []
    for n in (4, 64):
        x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
        strong_augment(x)  # the first call on a device caches a few constants there
        with _LaunchCount() as count:
            strong_augment(x)
        counts.append(count.launched)
    assert counts[0] == counts[1] <= 400


def test_op_table_is_torchssl_fixmatch():
    # TorchSSL datasets/augmentation/randaugment.py, augment_list (FixMatch's RandAugment)
    assert _RA_OPS == {
        "autocontrast": (0, 1),
        "brightness": (0.05, 0.95),
        "color": (0.05, 0.95),
        "contrast": (0.05, 0.95),
        "equalize": (0, 1),
        "identity": (0, 1),
        "posterize": (4, 8),
        "rotate": (-30, 30),
        "sharpness": (0.05, 0.95),
        "shear_x": (-0.3, 0.3),
        "shear_y": (-0.3, 0.3),
        "solarize": (0, 256),
        "translate_x": (-0.3, 0.3),
        "translate_y": (-0.3, 0.3),
    }


# --- weak_augment --------------------------------------------------------------------------------


def _recover_crops(x, out, pad):
    """Per image, (dy, dx, flipped) such that out is the crop of the reflect-padded x at (dy, dx),
    flipped or not; -1 where no crop matches."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad,) * 4, mode="reflect")
    found = torch.full((n, 3), -1)
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, :, dy : dy + h, dx : dx + w]
            for flipped in (0, 1):
                match = (out == (crop.flip(-1) if flipped else crop)).flatten(1).all(1)
                found[match] = torch.tensor([dy, dx, flipped])
    return found


@pytest.mark.parametrize("flip", [False, True])
def test_weak_augment_is_a_crop_of_the_reflect_padded_image(flip):
    torch.manual_seed(1)
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    out = weak_augment(x, flip=flip)
    found = _recover_crops(x, out, 4)
    assert (found >= 0).all()  # every image is an exact crop
    assert found[:, :2].min() == 0 and found[:, :2].max() == 8
    assert len(set(map(tuple, found[:, :2].tolist()))) > 30
    flipped = found[:, 2].float().mean()
    assert (0.3 < flipped < 0.7) if flip else (flipped == 0)


@pytest.mark.parametrize("shape,pad", [((48, 1, 28, 28), 4), ((16, 3, 96, 96), 12), ((48, 3, 24, 40), 3)])
def test_weak_augment_default_pad(shape, pad):
    # Default pad = int(0.125 * H + 0.5): offsets span exactly [0, 2 pad].
    torch.manual_seed(2)
    x = torch.randint(0, 256, shape, dtype=torch.uint8)
    out = weak_augment(x, flip=False)
    assert out.shape == x.shape and out.dtype == torch.uint8
    found = _recover_crops(x, out, pad)
    assert (found >= 0).all() and (found[:, 2] == 0).all()
    assert found[:, :2].max() > 2 * pad - 2  # rules out a smaller pad


def test_weak_augment_explicit_pad_zero_is_identity_without_flip():
    x = _images()
    assert torch.equal(weak_augment(x, flip=False, pad=0), x)


# --- strong_augment ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(8, 3, 32, 32), (8, 1, 28, 28), (4, 3, 24, 40), (4, 3, 96, 96)])
@pytest.mark.parametrize("flip", [True, False])
def test_strong_augment_shape_dtype_device(shape, flip):
    torch.manual_seed(3)
    x = torch.randint(0, 256, shape, dtype=torch.uint8)
    out = strong_augment(x, flip=flip)
    assert out.shape == x.shape and out.dtype == torch.uint8 and out.device == x.device


@pytest.mark.parametrize("shape", [(4, 3, 32, 32), (4, 1, 28, 28), (4, 3, 24, 40), (2, 3, 96, 96)])
def test_strong_without_ops_and_cutout_is_weak(shape):
    # num_ops=0 still runs the (identity) warp: it must be exact. cutout=0 draws an empty square.
    x = torch.randint(0, 256, shape, dtype=torch.uint8)
    torch.manual_seed(4)
    strong = strong_augment(x, num_ops=0, cutout=0.0)
    torch.manual_seed(4)
    assert torch.equal(strong, weak_augment(x))


def test_augment_is_per_image_and_seeded():
    x = _images()[:1].repeat(32, 1, 1, 1)
    for augment in (weak_augment, strong_augment):
        torch.manual_seed(5)
        a = augment(x)
        torch.manual_seed(5)
        assert torch.equal(a, augment(x))
        assert not torch.equal(a, augment(x))  # the generator moved on
        distinct = len({bytes(img.numpy()) for img in a})
        assert distinct >= (20 if augment is weak_augment else 32)


def test_cutout_square_filled_127():
    torch.manual_seed(6)
    x = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8)
    x[x == 127] = 126  # so that 127 marks the cutout
    out = strong_augment(x, flip=False, pad=0, num_ops=0, cutout=0.5)
    box = (out == 127).all(1)
    assert torch.equal(out, torch.where(box[:, None], 127, x))  # nothing else changed
    rows, cols = box.any(2), box.any(1)
    assert torch.equal(box, rows[:, :, None] & cols[:, None, :])  # an axis-aligned rectangle
    heights, widths = rows.sum(1), cols.sum(1)
    assert heights.max() <= math.ceil(0.5 * 32) and widths.max() <= math.ceil(0.5 * 32)
    for r in (rows, cols):  # contiguous
        first, last = r.float().argmax(1), 31 - r.flip(1).float().argmax(1)
        assert torch.equal((last - first + 1)[r.any(1)], r.sum(1)[r.any(1)])
    inner = ~(rows[:, 0] | rows[:, -1] | cols[:, 0] | cols[:, -1])  # not clipped: a square +- 1
    assert ((heights - widths).abs()[inner] <= 1).all()
    assert 6 < heights[inner].float().mean() < 10  # side ~ U(0, 16): mean 8
    assert (~inner).any()  # some are clipped at the border


@pytest.fixture
def tf32_matmul():
    """The training scripts' setting: float32 matmuls may run in TF32 on GPUs."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    yield
    torch.set_float32_matmul_precision(previous)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_never_syncs(tf32_matmul):
    x = _images().repeat(4, 1, 1, 1)
    m = torch.rand(len(x))
    for op in (_brightness, _color, _contrast, _sharpness, _posterize, _solarize):
        assert torch.equal(op(x.cuda(), m.cuda() * 8).cpu(), op(x, m * 8))
    for op in (_equalize, _autocontrast):
        assert torch.equal(op(x.cuda()).cpu(), op(x))
    n = len(x)
    for names, limits in ((["identity"], [1.0]), (["rotate", "shear_x"], [30.0, 0.3])):
        ops = torch.tensor([[_OP[name]] * n for name in names])
        mags = (torch.rand(len(names), n) * 2 - 1) * torch.tensor(limits)[:, None]
        ours = _rand_augment(x.cuda(), ops.cuda(), mags.cuda()).cpu().int()
        assert (ours - _rand_augment(x, ops, mags).int()).abs().max() <= 1
    shapes = [(64, 3, 32, 32), (16, 1, 28, 28), (8, 3, 96, 96)]
    for shape in shapes:  # the first call on a device caches a few constants there
        strong_augment(torch.zeros(shape, dtype=torch.uint8, device="cuda"))
    torch.cuda.set_sync_debug_mode("error")
    try:
        for shape in shapes:
            xc = torch.randint(0, 256, shape, dtype=torch.uint8, device="cuda")
            for out in (weak_augment(xc), strong_augment(xc)):
                assert out.shape == shape and out.dtype == torch.uint8 and out.is_cuda
    finally:
        torch.cuda.set_sync_debug_mode(0)
