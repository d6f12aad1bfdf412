"""Training steps of VAR and HMAR on tiny shapes (CPU, fp32 through the kernel's differentiable reference): the loss
falls over a few steps on one batch; masked fine-tuning moves the mask branch only."""

import torch

from accel.pipelines.hmar import HMARTransformer, VARTokenizer, VARTransformer
from accel.pipelines.hmar.training import (
    hidden_positions, mask_branch_parameters, masked_prediction_loss, next_scale_loss,
    start_mask_branch_from_next_scale, training_step,
)

SCALES = (1, 2, 4)
SIZE = dict(num_classes=5, depth=2, width=32, num_heads=2, vocab_size=64, codebook_dim=8, scales=SCALES)


def batch():
    torch.manual_seed(0)
    tok = VARTokenizer(vocab_size=64, codebook_dim=8, scales=SCALES, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                       norm_num_groups=4).eval()
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return tok, tok.encode(images), torch.tensor([0, 1, 2, 3])


def losses(loss, params, steps=6):
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    return [training_step(loss, optimizer) for _ in range(steps)]


def test_var_next_scale_loss_falls():
    tok, indices, labels = batch()
    model = VARTransformer(**SIZE)
    history = losses(lambda: next_scale_loss(model, tok, indices, labels, cond_drop_rate=0.0), model.parameters())
    assert history[-1] < 0.8 * history[0], history


def test_hmar_next_scale_loss_falls():
    tok, indices, labels = batch()
    model = HMARTransformer(branch_depth=1, **SIZE)
    history = losses(lambda: next_scale_loss(model, tok, indices, labels, cond_drop_rate=0.0), model.parameters())
    assert history[-1] < 0.8 * history[0], history
    assert all(p.grad is None for p in mask_branch_parameters(model))  # the mask branch takes no part


def test_masked_refinement_fine_tuning_trains_the_mask_branch_only():
    tok, indices, labels = batch()
    model = HMARTransformer(branch_depth=1, **SIZE)
    start_mask_branch_from_next_scale(model)
    assert torch.equal(model.mask_head.proj.weight, model.next_scale_head.proj.weight)
    trained = mask_branch_parameters(model)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if all(p is not t for t in trained)}
    g = torch.Generator().manual_seed(3)
    history = losses(lambda: masked_prediction_loss(model, tok, indices, labels, ratio=0.5, generator=g), trained)
    assert history[-1] < 0.8 * history[0], history
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters() if name in frozen)


def test_hidden_positions_take_the_ratio_of_every_scale():
    model = HMARTransformer(branch_depth=1, **SIZE)
    hidden = hidden_positions(model, 0.5, torch.Generator().manual_seed(0))
    assert hidden.shape == (20,) and int(hidden[:4].sum()) == 2 and int(hidden[4:].sum()) == 8
