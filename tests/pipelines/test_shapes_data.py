import torch

from accel.pipelines.shapes.data import COLOURS, DIRECTIONS, image_batch, shape_masks, video_batch


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
    assert all(c.startswith("a ") and " moving " in c for c in v.captions)
    assert len({c.split()[2] for c in image_batch(0, 1, 256).captions}) == 4  # every shape occurs


def test_shape_pixels_carry_the_captioned_colour():
    b = image_batch(1, 0, 32)
    for i in range(32):
        rgb = (b.pixels[i].reshape(3, -1).T + 1) / 2
        target = torch.tensor(list(COLOURS.values())[int(b.colour[i])])
        assert ((rgb - target).abs().max(1).values < 1e-5).sum() >= 20  # the shape covers >= 20 pixels


def test_videos_start_moving_in_the_captioned_direction_and_stay_in_frame():
    v = video_batch(2, 0, 32)
    colours = torch.tensor(list(COLOURS.values()))
    for i in range(32):
        target = colours[int(v.colour[i])].view(3, 1, 1, 1)
        mask = (((v.pixels[i] + 1) / 2 - target).abs().amax(0) < 1e-5).float()  # (T, H, W)
        ys, xs = torch.arange(32.0).view(1, 32, 1), torch.arange(32.0).view(1, 1, 32)
        area = mask.sum((1, 2))
        assert (area > 0).all()  # never leaves the frame
        cx, cy = (mask * xs).sum((1, 2)) / area, (mask * ys).sum((1, 2)) / area
        dx, dy = float(cx[7] - cx[0]), float(cy[7] - cy[0])
        expected = {"left": dx < -5, "right": dx > 5, "up": dy < -5, "down": dy > 5}
        assert expected[DIRECTIONS[int(v.direction[i])]]


def test_masks_are_distinct_per_shape():
    masks = shape_masks(torch.arange(4), torch.full((4,), 16.0), torch.full((4,), 16.0), torch.full((4,), 8.0), 32)
    areas = masks.sum((1, 2))
    assert len(set(areas.tolist())) == 4 and (areas > 30).all()
