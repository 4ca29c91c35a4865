"""--estep-features bank and --kmeans-init previous: the training steps' keys land in the bank at their samples'
indices on every rank (1 and 2 gloo processes, 8 simulated ranks with unequal shards), rows never written are
filled by a feature pass over those samples only, a warm k-means is the cold one given the cold one's start, and a
resumed run equals the uninterrupted one bit for bit."""

import os
import signal

import pytest
import torch
import torch.multiprocessing as mp

from collectives import WorldAudit
from conftest import free_port, tiny_args
from pcl import PCLError, Preempted
from pcl.checkpoint import load_checkpoint
from pcl.cluster import _torch_kmeans, kmeans, run_kmeans, run_kmeans_across_ranks
from pcl.config import validate_pretrain_args
from pcl.data import TensorEvalLoader
from pcl.engine import fit
from pcl.estep import compute_features, e_step
from pcl.features import FeatureBank
from pcl.model import MoCo
from pcl.settings import EStepSettings

N, DIM, B = 81, 16, 3  # 8 ranks x 3 samples per step; 2 steps write 48 rows, 33 are left to the feature pass


def _code(index: torch.Tensor) -> torch.Tensor:
    """A distinct unit row per sample index (what a key would be), so a row at the wrong index shows."""
    x = torch.stack([torch.sin(index.double() * (j + 1) * 0.37) for j in range(DIM)], 1).float()
    return torch.nn.functional.normalize(x, dim=1)


def _images():
    return (torch.rand(N, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)


def _model():
    torch.manual_seed(0)
    return MoCo("resnet18", DIM, 64, 0.99, True, 4, "small")


def _bank_e_step(rank: int, world: int, settings: EStepSettings):
    """Two training steps' writes (each rank its own B indices of a global batch), then the E-step on the bank."""
    order = torch.randperm(N, generator=torch.Generator().manual_seed(1))
    bank = FeatureBank(N, DIM, "cpu")
    for step in range(2):
        batch = order[step * B * 8:(step + 1) * B * 8]  # the global batch of this step
        mine = batch.view(8, B)[rank::world].flatten()  # what this rank trained on
        gathered = batch.view(8, B).view(world, -1)  # rank order, as all_gather_cat gives it
        bank.write(_code(gathered.flatten()), mine)
    images = _images()
    out = e_step(_model(), None, N, settings, torch.device("cpu"), bank=bank,
                 fill_loader=lambda idx: TensorEvalLoader(images, 5, indices=idx))
    return bank, out, order[:48]


def test_bank_rows_land_at_their_indices_on_8_simulated_ranks_with_unequal_fill_shards(tmp_path):
    settings = EStepSettings.of(validate_pretrain_args(tiny_args(tmp_path, "--num-cluster", "4,8", "--low-dim",
                                                                  str(DIM), "--estep-features", "bank")))
    audit = WorldAudit(8)
    outcomes = audit.run(lambda rank: _bank_e_step(rank, 8, settings))
    assert not audit.mismatches(), "\n".join(audit.mismatches())
    single_bank, single, written = _bank_e_step(0, 1, settings)
    assert single.filled == N - 48 and bool(single_bank.written.all())
    assert torch.equal(single_bank.features[written], _code(written))  # each key at its sample's row
    missing = torch.ones(N, dtype=torch.bool)
    missing[written] = False
    passed = compute_features(_model(), TensorEvalLoader(_images(), 5), torch.device("cpu"), N, False)
    # filled by the pass, those rows only (other batches than the full pass's: equal to float rounding)
    assert torch.allclose(single_bank.features[missing], passed[missing], atol=1e-6)
    first_bank, first, _ = outcomes[0]
    assert torch.equal(first_bank.features[written], _code(written))
    assert torch.allclose(first_bank.features, single_bank.features, atol=1e-6)  # the fill in other batches
    for bank, out, _ in outcomes:  # every rank: the same bank (bit for bit) and the same prototypes
        assert torch.equal(bank.features, first_bank.features) and bool(bank.written.all())
        for a, b in zip(out.clusters.im2cluster, first.clusters.im2cluster):
            assert torch.equal(a, b)


def _gloo_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    from pcl.engine import setup

    flags = ["--estep-features", "bank", "-b", "32"]
    if world > 1:
        flags += ["--dist-url", f"tcp://127.0.0.1:{port}", "--world-size", str(world), "--rank", str(rank)]
    cfg = validate_pretrain_args(tiny_args(os.path.join(out, "exp"), *flags))
    device, data, model, _ = setup(cfg)
    moco = model.module if world > 1 else model
    bank = FeatureBank(data.num_samples, cfg.low_dim, device)
    data.train_loader.set_epoch(0)
    seen_keys, seen_index = [], []
    model.train()
    for step, (im_q, im_k, index) in enumerate(data.train_loader):
        if step == 3:
            break
        with torch.no_grad():
            _, k = moco(im_q, im_k)
        keys = moco.dequeue_and_enqueue(k)
        bank.write(keys, index)
        seen_keys.append(k)
        seen_index.append(torch.as_tensor(index))
    torch.save({"features": bank.features, "written": bank.written, "keys": torch.cat(seen_keys),
                "index": torch.cat(seen_index)}, os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.parametrize("world", [1, 2])
def test_training_steps_write_their_keys_at_their_samples_on_gloo(tmp_path, world):
    if world == 1:
        _gloo_worker(0, 1, 0, str(tmp_path))
    else:
        mp.spawn(_gloo_worker, args=(world, free_port(), str(tmp_path)), nprocs=world)
    recs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for rec in recs:
        assert torch.equal(rec["features"], recs[0]["features"]) and torch.equal(rec["written"], recs[0]["written"])
        assert torch.equal(rec["features"][rec["index"]], rec["keys"])  # this rank's keys at its indices
    written = torch.cat([rec["index"] for rec in recs])
    assert written.unique().numel() == written.numel() == int(recs[0]["written"].sum()) == 3 * 32
    assert torch.equal(recs[0]["written"].nonzero().flatten(), written.sort().values)


def test_a_warm_start_from_the_cold_starts_rows_is_the_cold_run():
    """--kmeans-init previous only replaces the random start: given the rows the cold run (nredo 1) drew, it is
    that run exactly (no empty cluster, so no split draws either)."""
    x = torch.nn.functional.normalize(torch.randn(600, 8, generator=torch.Generator().manual_seed(2)), dim=1)
    start = x[torch.randperm(600, generator=torch.Generator().manual_seed(5))[:12]]  # the cold run's draw, seed 5
    cold = _torch_kmeans(x, 12, 5, 10, 1)
    warm = _torch_kmeans(x, 12, 5, 10, 1, init=start)
    for a, b in zip(cold, warm):
        assert torch.equal(a, b)
    across = run_kmeans_across_ranks(x, torch.arange(600), 600, [12], 0.2, seed=5, niter=10, nredo=1, init=[start])
    assert torch.equal(across.im2cluster[0], cold[2])


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_a_warm_start_from_a_converged_solution_stays_there(backend):
    pytest.importorskip("faiss") if backend == "faiss" else None
    x = torch.nn.functional.normalize(torch.randn(900, 8, generator=torch.Generator().manual_seed(3)), dim=1)
    centroids, _, assign = kmeans(x, 9, seed=0, niter=200, nredo=1, backend=backend)
    warm = kmeans(x, 9, seed=7, niter=5, nredo=3, backend=backend, init=centroids)
    assert torch.equal(warm[2].long(), assign.long())
    result = run_kmeans(x, [9], 0.2, seed=7, niter=5, nredo=3, backend=backend, init=[centroids])
    assert torch.equal(result.im2cluster[0], assign.long()) and result.objective[0] > 0
    with pytest.raises(PCLError, match=r"warm start for k=9: the previous centroids are \(4, 8\)"):
        run_kmeans(x, [9], 0.2, backend=backend, init=[centroids[:4]])


BANK = ("--estep-features", "bank", "--kmeans-init", "previous", "--kmeans-warm-check", "2", "--epochs", "4",
        "--warmup-epoch", "1", "--save-freq", "1")


def _weights_and_bank(path):
    ckpt = load_checkpoint(path)
    return ckpt["state_dict"], ckpt["estep_bank"], ckpt["cluster_result"]


def _assert_same(a, b):
    for x, y in zip(a, b):
        if isinstance(x, dict):
            assert x.keys() == y.keys()
            for key in x:
                _assert_same([x[key]], [y[key]])
        elif isinstance(x, list):
            _assert_same(x, y)
        else:
            assert torch.equal(x, y)


def test_bank_and_warm_start_resume_bit_for_bit(tmp_path):
    """Uninterrupted; resumed at an epoch boundary; stopped mid-epoch (SIGTERM) and resumed: the same weights,
    bank and prototypes at the end."""
    full, part, cut = tmp_path / "full", tmp_path / "part", tmp_path / "cut"
    fit(tiny_args(full, *BANK))
    os.makedirs(part)
    fit(tiny_args(part, *BANK, "--resume", str(full / "checkpoint_0001.pth.tar")))

    def preempt(epoch, step):
        if (epoch, step) == (2, 5):
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Preempted):
        fit(tiny_args(cut, *BANK), on_step=preempt)
    fit(tiny_args(cut, *BANK, "--resume", "auto"))
    want = _weights_and_bank(full / "checkpoint_0003.pth.tar")
    assert bool(want[1]["written"].all())
    for other in (part, cut):
        _assert_same(want, _weights_and_bank(other / "checkpoint_0003.pth.tar"))
    lines = (full / "log.txt").read_text()
    assert '"nmi_warm_cold_k10"' in lines and '"estep_filled"' in lines and '"kmeans_obj_k20"' in lines


def test_the_feature_pass_runs_under_the_runs_amp(tmp_path):
    """--amp bf16 reaches the E-step's forward (features within bf16 rounding of fp32, not equal); fp32 by default."""
    def clusters_and_features(*flags):
        cfg = validate_pretrain_args(tiny_args(tmp_path, "--num-cluster", "4,8", "--low-dim", str(DIM),
                                               "--prototype-gallery", *flags))
        return e_step(_model(), TensorEvalLoader(_images(), 5), N, EStepSettings.of(cfg), torch.device("cpu"))

    fp32, bf16 = clusters_and_features(), clusters_and_features("--amp", "bf16")
    passed = compute_features(_model(), TensorEvalLoader(_images(), 5), torch.device("cpu"), N, False)
    assert torch.equal(fp32.features, passed)
    assert not torch.equal(bf16.features, passed) and torch.allclose(bf16.features, passed, atol=0.05)
