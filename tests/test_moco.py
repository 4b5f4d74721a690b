import copy

import pytest
import torch
import torch.nn.functional as F

from caid_hf import CAiDConfig, CAiDForPreTraining
from caid_hf.objectives.common import global_pool
from caid_hf.objectives.moco import MoCoV2
from caid_hf.objectives.shuffle_bn_emulation import encode_in_splits


def _inputs(batch=4, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, 3, size, size, generator=g),
            torch.rand(batch, 3, size, size, generator=g),
            torch.rand(batch, 1, size, size, generator=g))


def _independent_loss(model, q_img, k_img, target, momentum_step: bool):
    """The CAiD loss written out by hand from the paper and the original code, on a copy of the model."""
    m = copy.deepcopy(model)
    c = m.config
    enc_q, head_q = m.caid.encoder, m.objective.projection_head
    enc_k, head_k = m.objective.momentum_encoder, m.objective.momentum_projection_head
    with torch.no_grad():
        if momentum_step:
            for pk, pq in zip([*enc_k.parameters(), *head_k.parameters()],
                              [*enc_q.parameters(), *head_q.parameters()]):
                pk.mul_(c.momentum).add_(pq, alpha=1 - c.momentum)
    feats = enc_q(q_img)
    q = F.normalize(head_q(feats[-1].mean((2, 3))), dim=1)
    with torch.no_grad():
        k = F.normalize(head_k(enc_k(k_img)[-1].mean((2, 3))), dim=1)
    queue = model.objective.queue.clone()
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue], dim=1)
    ce = F.cross_entropy(logits / c.contrastive_temperature, torch.zeros(len(q), dtype=torch.long))
    recon = torch.sigmoid(m.caid.segmentation_head(m.caid.decoder(feats)))
    mse = F.mse_loss(recon, target)
    return c.contrastive_weight * ce + c.reconstruction_weight * mse, ce, mse


def test_loss_matches_independent_computation_in_training_mode():
    config = CAiDConfig(encoder_name="resnet18", image_size=64, queue_size=32, projection_dim=16,
                        shuffle_bn_splits=1, momentum=0.9)
    model = CAiDForPreTraining(config)
    q_img, k_img, target = _inputs()
    model.train()
    expected, ce, mse = _independent_loss(model.train(), q_img, k_img, target, momentum_step=True)
    out = model(q_img, k_img, labels=target)
    torch.testing.assert_close(out.contrastive_loss, ce, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.reconstruction_loss, mse, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.loss, expected, rtol=0, atol=1e-5)
    assert out.logits.shape == (4, 33)


def test_loss_matches_independent_computation_in_eval_mode(tiny_config):
    model = CAiDForPreTraining(tiny_config)
    q_img, k_img, target = _inputs(seed=1)
    expected, _, _ = _independent_loss(model.eval(), q_img, k_img, target, momentum_step=False)
    queue_before = model.objective.queue.clone()
    out = model(q_img, k_img, labels=target)
    torch.testing.assert_close(out.loss, expected, rtol=0, atol=1e-5)
    # evaluation neither enqueues nor moves the key branch
    assert torch.equal(model.objective.queue, queue_before) and int(model.objective.queue_ptr) == 0


def test_momentum_update_hand_computed():
    encoder = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False))
    moco = MoCoV2(torch.nn.Sequential(torch.nn.Identity()), feature_dim=2, projection_dim=2,
                  queue_size=4, momentum=0.9, head="linear")
    moco.momentum_encoder = copy.deepcopy(encoder)
    with torch.no_grad():
        encoder[0].weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        moco.momentum_encoder[0].weight.copy_(torch.tensor([[0.0, 0.0], [10.0, -10.0]]))
        moco.projection_head.weight.fill_(1.0)
        moco.projection_head.bias.fill_(0.5)
        moco.momentum_projection_head.weight.fill_(0.0)
        moco.momentum_projection_head.bias.fill_(0.0)
    moco.momentum_update(encoder)
    torch.testing.assert_close(moco.momentum_encoder[0].weight,
                               torch.tensor([[0.1, 0.2], [9.3, -8.6]]))
    torch.testing.assert_close(moco.momentum_projection_head.weight, torch.full((2, 2), 0.1))
    torch.testing.assert_close(moco.momentum_projection_head.bias, torch.full((2,), 0.05))
    # the query side is untouched
    torch.testing.assert_close(encoder[0].weight, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))


def test_enqueue_writes_at_pointer_and_wraps_around():
    moco = MoCoV2(torch.nn.Identity(), feature_dim=2, projection_dim=2, queue_size=6)
    with torch.no_grad():
        moco.queue.zero_()
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 2.0]])
    moco.enqueue(keys)
    assert int(moco.queue_ptr) == 4
    assert torch.equal(moco.queue[:, :4], keys.T) and torch.equal(moco.queue[:, 4:], torch.zeros(2, 2))
    moco.enqueue(keys + 10)
    # columns 4, 5 then 0, 1 receive the new keys; 2, 3 keep the old ones
    assert int(moco.queue_ptr) == 2
    assert torch.equal(moco.queue[:, 4], keys[0] + 10) and torch.equal(moco.queue[:, 5], keys[1] + 10)
    assert torch.equal(moco.queue[:, 0], keys[2] + 10) and torch.equal(moco.queue[:, 1], keys[3] + 10)
    assert torch.equal(moco.queue[:, 2:4], keys[2:].T)


def test_training_step_enqueues_its_keys():
    config = CAiDConfig(encoder_name="resnet18", image_size=64, queue_size=32, projection_dim=16,
                        shuffle_bn_splits=1, momentum=0.9)
    model = CAiDForPreTraining(config).train()
    q_img, k_img, target = _inputs()
    with torch.no_grad():  # the keys by hand: momentum step, then the key branch on the key views
        copy_ = copy.deepcopy(model)
        enc_q, head_q = copy_.caid.encoder, copy_.objective.projection_head
        enc_k, head_k = copy_.objective.momentum_encoder, copy_.objective.momentum_projection_head
        for pk, pq in zip([*enc_k.parameters(), *head_k.parameters()],
                          [*enc_q.parameters(), *head_q.parameters()]):
            pk.mul_(0.9).add_(pq, alpha=0.1)
        keys = F.normalize(head_k(enc_k(k_img)[-1].mean((2, 3))), dim=1)
    untouched = model.objective.queue[:, 4:].clone()
    out = model(q_img, k_img, labels=target)
    assert int(model.objective.queue_ptr) == 4
    torch.testing.assert_close(model.objective.queue[:, :4], keys.T, rtol=0, atol=1e-5)
    assert torch.equal(model.objective.queue[:, 4:], untouched)
    assert out.logits.shape == (4, 1 + config.queue_size)


def test_key_branch_receives_no_gradient(tiny_config):
    model = CAiDForPreTraining(tiny_config).train()
    q_img, k_img, target = _inputs()
    model(q_img, k_img, labels=target).loss.backward()
    assert all(p.grad is None for p in model.objective.momentum_parameters())
    assert not any(p.requires_grad for p in model.objective.momentum_parameters())
    assert model.caid.encoder.conv1.weight.grad.abs().sum() > 0
    assert model.objective.projection_head[0].weight.grad.abs().sum() > 0
    assert model.caid.decoder.blocks[0].conv1[0].weight.grad.abs().sum() > 0


def test_shuffle_bn_emulation_returns_keys_in_input_order(tiny_config):
    model = CAiDForPreTraining(tiny_config)
    moco = model.objective.train()
    moco.momentum_encoder.eval()  # fixed BN statistics: the result cannot depend on the split
    k_img = _inputs(batch=6)[1]
    with torch.no_grad():
        plain = F.normalize(moco.momentum_projection_head(
            global_pool(moco.momentum_encoder(k_img)[-1])), dim=1)
    torch.manual_seed(3)
    shuffled = moco.encode_keys(k_img)
    torch.testing.assert_close(shuffled, plain, rtol=0, atol=1e-6)


def test_shuffle_bn_emulation_uses_sub_batch_statistics(tiny_config):
    """In training mode the keys depend on which other images share their sub-batch."""
    model = CAiDForPreTraining(tiny_config)
    moco = model.objective.train()
    k_img = _inputs(batch=8)[1]
    torch.manual_seed(0)
    a = moco.encode_keys(k_img)
    torch.manual_seed(1)
    b = moco.encode_keys(k_img)
    assert not torch.allclose(a, b, atol=1e-4)
    moco.shuffle_bn_splits = 1
    torch.manual_seed(0)
    c = moco.encode_keys(k_img)
    torch.manual_seed(1)
    assert torch.allclose(c, moco.encode_keys(k_img), atol=1e-6)


def test_instance_discrimination_baseline_skips_the_decoder():
    config = CAiDConfig(encoder_name="resnet18", image_size=64, queue_size=32, projection_dim=16,
                        context_prediction=False, contrastive_weight=2.0)
    model = CAiDForPreTraining(config).train()
    assert not any(p.requires_grad for p in model.caid.decoder.parameters())
    calls = []
    model.caid.decoder.register_forward_hook(lambda *a: calls.append(1))
    q_img, k_img, target = _inputs()
    out = model(q_img, k_img, labels=target)
    assert out.reconstruction is None and out.reconstruction_loss is None and not calls
    torch.testing.assert_close(out.loss, 2.0 * out.contrastive_loss)
    out.loss.backward()
    assert all(p.grad is None for p in model.caid.decoder.parameters())


def test_momentum_update_can_be_skipped_for_accumulation_micro_batches(tiny_config):
    model = CAiDForPreTraining(tiny_config).train()
    with torch.no_grad():
        model.caid.encoder.conv1.weight.add_(1.0)  # query and key branch now differ
    before = model.objective.momentum_encoder.conv1.weight.clone()
    q_img, k_img, target = _inputs()
    model(q_img, k_img, labels=target, update_momentum=False)
    assert torch.equal(model.objective.momentum_encoder.conv1.weight, before)
    assert int(model.objective.queue_ptr) == 4  # keys are still enqueued
    model(q_img, k_img, labels=target)
    m = tiny_config.momentum
    expected = m * before + (1 - m) * model.caid.encoder.conv1.weight
    torch.testing.assert_close(model.objective.momentum_encoder.conv1.weight, expected)


def test_bad_forward_arguments_are_refused(tiny_config):
    import pytest

    model = CAiDForPreTraining(tiny_config).train()
    q_img, k_img, target = _inputs()
    with pytest.raises(TypeError, match="label"):
        model(q_img, k_img, label=target)  # typo of labels: would train contrastive-only
    with pytest.raises(ValueError, match=r"labels must be .*\[4, 1, 64, 64\]"):
        model(q_img, k_img, labels=target[:, 0])


def test_queue_is_excluded_from_ddp_buffer_broadcast(tiny_config, tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = CAiDForPreTraining(tiny_config)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        broadcast = list(ddp.modules_buffers)
        assert not any(b is model.objective.queue or b is model.objective.queue_ptr
                       for b in broadcast)
        # BatchNorm statistics are still kept in sync as usual
        assert any(b is model.caid.encoder.bn1.running_mean for b in broadcast)
    finally:
        dist.destroy_process_group()


def test_one_process_emulation_normalises_encoder_and_decoder_per_device(tiny_config):
    """shuffle_bn_splits=2 on one process gives each half of the batch what one of two
    devices computes in the original: its own encoder *and decoder* BatchNorm statistics,
    so the reconstruction, and with it the MSE, equal the two-device values."""
    model = CAiDForPreTraining(tiny_config).train()
    q_img, k_img, target = _inputs(batch=8)
    out = model(pixel_values=q_img, key_pixel_values=k_img, labels=target)
    devices = []
    for half in range(2):  # what each of 2 devices computes with the same weights
        device = copy.deepcopy(model).train()
        rows = slice(4 * half, 4 * half + 4)
        with torch.no_grad():
            features = device.caid.encoder(q_img[rows])
            devices.append(torch.sigmoid(device.caid.segmentation_head(
                device.caid.decoder(features))))
    per_device = torch.cat(devices)
    torch.testing.assert_close(out.reconstruction, per_device, rtol=0, atol=1e-6)
    # DDP averages the two devices' losses (equal halves): the mean of their MSEs
    two_device_mse = torch.stack([F.mse_loss(d, target[4 * h:4 * h + 4])
                                  for h, d in enumerate(devices)]).mean()
    torch.testing.assert_close(out.reconstruction_loss, two_device_mse, rtol=0, atol=1e-6)
    # the decoder over the whole batch (what the emulation did before) is measurably different
    with torch.no_grad():
        whole = copy.deepcopy(model).train()
        merged = torch.sigmoid(whole.caid.segmentation_head(whole.caid.decoder(
            encode_in_splits(whole.caid.encoder, q_img, 2))))
    assert (merged - per_device).abs().max() > 1e-4


def test_one_pass_split_batch_norm_equals_a_pass_per_sub_batch(tiny_config, monkeypatch):
    """The emulation's BatchNorm splits inside one pass of the network (convolutions on the
    whole batch); in fp32 that equals encoding and decoding each sub-batch separately:
    outputs and running statistics to 1e-6, gradients to float32 summation order."""
    import caid_hf.objectives.shuffle_bn_emulation as emulation
    from caid_hf.objectives.shuffle_bn_emulation import SplitBatchNorm2d

    base = CAiDForPreTraining(tiny_config).train()
    norms = [m for m in base.modules() if isinstance(m, SplitBatchNorm2d)]
    assert len(norms) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in base.modules())
    q_img, k_img, target = _inputs(batch=8)
    results = []
    # the query branch in one pass (the GPU policy, forced here), the CPU's policy (query
    # encoder and decoder once per sub-batch, the key encoder in one pass), and every
    # network once per sub-batch (no split BatchNorm at all)
    for arm in ("one pass", "device policy", "per sub-batch"):
        model = copy.deepcopy(base)
        if arm == "one pass":
            monkeypatch.setattr(emulation, "query_in_one_pass", lambda x: True)
        elif arm == "per sub-batch":
            monkeypatch.setattr(emulation, "_splittable", lambda norms: False)
        torch.manual_seed(1)
        out = model(pixel_values=q_img, key_pixel_values=k_img, labels=target)
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads, dict(model.named_buffers())))
        monkeypatch.undo()
        # the splits hold only inside a forward
        assert all(m.splits == 1 for m in model.modules() if isinstance(m, SplitBatchNorm2d))
    a, grads_a, buffers_a = results[0]
    for b, grads_b, buffers_b in results[1:]:
        torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=1e-6)
        torch.testing.assert_close(a.reconstruction, b.reconstruction, rtol=0, atol=1e-6)
        torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-6)
        assert grads_a.keys() == grads_b.keys() and len(grads_a) > 50
        for name in grads_a:
            # a weight gradient is a sum over every position of the batch (the stem's over
            # 8 x 32 x 32 = 8,192), which the convolution kernels order differently for one
            # batch of 8 and two of 4: measured 3.5e-6 on the stem's gradient (largest entry
            # 1.0) with AVX2 kernels (AMD EPYC Zen 3), under 1e-6 with AVX-512 ones; about
            # sqrt(8192) float32 roundings of the largest entry
            scale = max(1.0, grads_a[name].abs().max().item())
            torch.testing.assert_close(grads_a[name], grads_b[name], rtol=0, atol=1e-5 * scale,
                                       msg=name)
        for name in buffers_a:  # running statistics: one update per sub-batch, in order
            torch.testing.assert_close(buffers_a[name], buffers_b[name], rtol=0, atol=1e-6,
                                       msg=name)
    # the three arms did take different paths: the CPU policy ran sub-batch passes
    assert not emulation.query_in_one_pass(q_img)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_traced_split_batch_norm_equals_the_kernels(momentum, monkeypatch):
    """What torch.compile traces (reductions and elementwise ops, each running statistic
    updated once for all sub-batches) equals the kernel path: outputs, input and weight
    gradients, running statistics, in fp32 to 1e-5, channels_last and uneven sub-batches
    (7 images in 3) included; under bf16 autocast, to bf16 rounding."""
    import caid_hf.objectives.shuffle_bn_emulation as emulation
    from caid_hf.objectives.shuffle_bn_emulation import SplitBatchNorm2d, batch_norm_splits

    torch.manual_seed(0)
    base = SplitBatchNorm2d(5, momentum=momentum).train()
    with torch.no_grad():
        base.weight.uniform_(0.5, 1.5)
        base.bias.uniform_(-1, 1)
        base.running_mean.uniform_(-1, 1)
        base.num_batches_tracked.fill_(3)
    x0 = (torch.randn(7, 5, 6, 6) * 3 + 1).contiguous(memory_format=torch.channels_last)
    runs = {}
    for traced in (False, True):
        norm = copy.deepcopy(base)
        monkeypatch.setattr(emulation, "_traced", lambda t=traced: t)
        x = x0.clone().requires_grad_()
        with batch_norm_splits(norm, 3):
            out = norm(x)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        runs[traced] = tuple(t.detach().clone() for t in (
            out, x.grad, norm.weight.grad, norm.bias.grad, norm.running_mean,
            norm.running_var, norm.num_batches_tracked))
        with torch.autocast("cpu", dtype=torch.bfloat16), batch_norm_splits(norm, 3):
            runs[traced, "bf16"] = norm(x0.to(torch.bfloat16)).float()
    for kernel, traced in zip(runs[False], runs[True]):
        torch.testing.assert_close(kernel, traced, rtol=0, atol=1e-5)
    assert runs[True][0].is_contiguous(memory_format=torch.channels_last)
    assert int(runs[True][-1]) == 6
    assert (runs[True][4] - base.running_mean).abs().max() > 0.05  # the statistics moved
    torch.testing.assert_close(runs[False, "bf16"], runs[True, "bf16"], rtol=0.02, atol=0.05)


def test_traced_model_step_equals_the_kernels_in_float64(tiny_config, monkeypatch):
    """The whole pre-training step with every split BatchNorm as torch.compile traces it
    (reductions; the query branch in one pass, as under compile on any device) equals the
    kernel path: loss, every gradient and running statistic, in float64 to 1e-10. (In fp32
    the two orders of summation differ by up to 5e-3 in the stem's gradient: batch-4
    BatchNorms at 2 x 2 pixels amplify rounding.)"""
    import caid_hf.objectives.shuffle_bn_emulation as emulation

    base = CAiDForPreTraining(tiny_config).train().double()
    q_img, k_img, target = (t.double() for t in _inputs(batch=8))
    runs = []
    for traced in (False, True):
        model = copy.deepcopy(base)
        monkeypatch.setattr(emulation, "query_in_one_pass", lambda x: True)
        monkeypatch.setattr(emulation, "_traced", lambda t=traced: t)
        torch.manual_seed(1)
        out = model(pixel_values=q_img, key_pixel_values=k_img, labels=target)
        out.loss.backward()
        runs.append((out.loss, {n: p.grad for n, p in model.named_parameters()
                                if p.grad is not None}, dict(model.named_buffers())))
    (loss_k, grads_k, buffers_k), (loss_t, grads_t, buffers_t) = runs
    torch.testing.assert_close(loss_k, loss_t, rtol=0, atol=1e-10)
    assert grads_k.keys() == grads_t.keys() and len(grads_k) > 50
    for name in grads_k:
        torch.testing.assert_close(grads_k[name], grads_t[name], rtol=0, atol=1e-10, msg=name)
    for name in buffers_k:
        torch.testing.assert_close(buffers_k[name], buffers_t[name], rtol=0, atol=1e-10,
                                   msg=name)
    moved = base.caid.encoder.bn1.running_var
    assert (buffers_t["caid.encoder.bn1.running_var"] - moved).abs().max() > 1e-3


def test_split_batch_norm_without_gradient_adds_no_autograd_node():
    """The key encoder runs without gradient: its split BatchNorm then calls the kernels
    directly (no autograd node), with the same outputs and running statistics as with one."""
    from caid_hf.objectives.shuffle_bn_emulation import SplitBatchNorm2d

    torch.manual_seed(0)
    x = torch.randn(6, 4, 5, 5) * 3 + 1
    with_grad, without = SplitBatchNorm2d(4).train(), SplitBatchNorm2d(4).train()
    with_grad.splits = without.splits = 2
    out = with_grad(x)
    with torch.no_grad():
        plain = without(x)
    assert out.grad_fn is not None and plain.grad_fn is None
    torch.testing.assert_close(plain, out, rtol=0, atol=0)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(without, name), getattr(with_grad, name), rtol=0, atol=0)
    # and each half is normalised by its own statistics
    halves = plain.tensor_split(2)
    for half in halves:
        torch.testing.assert_close(half.mean(dim=(0, 2, 3)), torch.zeros(4), rtol=0, atol=1e-5)
    assert int(without.num_batches_tracked) == 2
