import pytest
import torch

from accel.pipelines.shapes.data import (
    COLOURS, DIRECTIONS, TRAIL_OPACITY, image_batch, image_caption, shape_masks, video_batch, video_caption,
)


def test_batches_are_deterministic_and_seed_dependent():
    a, b = image_batch(3, 7, 16), image_batch(3, 7, 16)
    assert torch.equal(a.pixels, b.pixels) and a.captions == b.captions
    assert not torch.equal(a.pixels, image_batch(4, 7, 16).pixels)
    v1, v2 = video_batch(3, 7, 4), video_batch(3, 7, 4)
    assert torch.equal(v1.pixels, v2.pixels) and v1.captions == v2.captions


def test_value_ranges_shapes_and_captions():
    b = image_batch(0, 0, 64)
    assert b.pixels.shape == (64, 3, 32, 32) and b.pixels.min() >= -1 and b.pixels.max() <= 1
    v = video_batch(0, 0, 8)
    assert v.pixels.shape == (8, 3, 17, 32, 32)
    assert v.captions == [video_caption(int(s), int(c), int(d)) for s, c, d in zip(v.shape, v.colour, v.direction)]
    assert b.captions == [image_caption(int(s), int(c)) for s, c in zip(b.shape, b.colour)]
    assert len({c.split()[2] for c in image_batch(0, 1, 256).captions}) == 4  # every shape occurs


def test_shape_pixels_carry_the_captioned_colour():
    b = image_batch(1, 0, 32)
    for i in range(32):
        rgb = (b.pixels[i].reshape(3, -1).T + 1) / 2
        target = torch.tensor(list(COLOURS.values())[int(b.colour[i])])
        assert ((rgb - target).abs().max(1).values < 1e-5).sum() >= 20  # the shape covers >= 20 pixels


def _centres(v, i):
    target = torch.tensor(list(COLOURS.values()))[int(v.colour[i])].view(3, 1, 1, 1)
    mask = (((v.pixels[i] + 1) / 2 - target).abs().amax(0) < 1e-5).float()  # (T, H, W)
    ys, xs = torch.arange(32.0).view(1, 32, 1), torch.arange(32.0).view(1, 1, 32)
    area = mask.sum((1, 2))
    assert (area > 0).all()  # never leaves the frame
    return (mask * xs).sum((1, 2)) / area, (mask * ys).sum((1, 2)) / area


def test_videos_move_the_captioned_way_throughout_and_stay_in_frame():
    v = video_batch(2, 0, 32)
    for i in range(32):
        cx, cy = _centres(v, i)
        along = {"left": -cx, "right": cx, "up": -cy, "down": cy}[DIRECTIONS[int(v.direction[i])]]
        assert (along.diff() >= 0).all() and along[-1] - along[0] > 9  # one way (pixel-quantised), 0.6-0.9 px per frame
        assert float((cy if DIRECTIONS[int(v.direction[i])] in ("left", "right") else cx).std()) < 0.3


def test_later_frames_continue_the_path_and_bounce():
    clip, later = video_batch(5, 1, 16), video_batch(5, 1, 16, frames=40, start=10)
    assert torch.equal(later.pixels[:, :, :7], clip.pixels[:, :, 10:17])
    turned = 0
    for i in range(16):
        cx, cy = _centres(later, i)
        along = {"left": -cx, "right": cx, "up": -cy, "down": cy}[DIRECTIONS[int(later.direction[i])]]
        turned += bool((along.diff() < -0.3).any())
    assert turned >= 8  # within 50 frames most shapes reach an edge and come back


def test_a_motion_trail_fades_behind_the_shape_and_leaves_the_shape_as_it_was():
    plain, trailed = video_batch(4, 0, 16), video_batch(4, 0, 16, trail=True)
    assert torch.equal(video_batch(4, 0, 16, trail=True).pixels, trailed.pixels) and plain.captions == trailed.captions
    for i in range(16):
        cx, cy = _centres(plain, i)
        assert torch.allclose(torch.stack(_centres(trailed, i)), torch.stack([cx, cy]))  # the shape as without a trail
        changed = (trailed.pixels[i] != plain.pixels[i]).any(0)  # (T, H, W): where the trail is
        ys, xs = torch.nonzero(changed[8], as_tuple=True)
        tx, ty = xs.float().mean() - cx[8], ys.float().mean() - cy[8]  # the trail's centre, from the shape's
        behind = {"left": tx, "right": -tx, "up": ty, "down": -ty}[DIRECTIONS[int(plain.direction[i])]]
        assert len(xs) >= 4 and behind > 1
        # It fades: the further behind the shape, the less of the shape's colour is blended in (at most TRAIL_OPACITY).
        target = torch.tensor(list(COLOURS.values()))[int(plain.colour[i])].view(3, 1, 1)
        before, after = (plain.pixels[i, :, 8] + 1) / 2, (trailed.pixels[i, :, 8] + 1) / 2  # in [0, 1]
        mix = (after - before).norm(dim=0) / (target - before).norm(dim=0)
        distance = (xs - cx[8]).abs() + (ys - cy[8]).abs()
        near, far = mix[ys, xs][distance <= distance.median()], mix[ys, xs][distance > distance.median()]
        assert near.mean() > far.mean() and 0 < float(mix[ys, xs].max()) <= TRAIL_OPACITY + 1e-4
    with pytest.raises(ValueError, match="constant velocity"):
        video_batch(4, 0, 4, frames=40, trail=True)  # past a clip's length shapes bounce: a trail would lie


def test_masks_are_distinct_per_shape():
    masks = shape_masks(torch.arange(4), torch.full((4,), 16.0), torch.full((4,), 16.0), torch.full((4,), 8.0), 32)
    areas = masks.sum((1, 2))
    assert len(set(areas.tolist())) == 4 and (areas > 30).all()
