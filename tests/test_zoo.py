"""The embedded pair (dgfast.zoo): files, loading, a quick sample, the metric, and the demo end to end."""
import json
import os

import numpy as np
import pytest
import torch

import dgfast
from dgfast import zoo
from dgfast.zoo import data, metrics
from dgfast.zoo.diffusion_train import TrainDiffusion


@pytest.fixture(scope="module")
def pair():
    return zoo.load_pair()


def test_shipped_files_fit_the_budget():
    info = zoo.load_info()
    files = [info[k]["file"] for k in ("pretrained", "finetuned", "encoder")]
    sizes = [os.path.getsize(os.path.join(zoo.ZOO_DIR, f)) for f in files]
    assert sum(sizes) <= 10 * 2 ** 20, sizes


def test_load_pair(pair):
    finetuned, pretrained, info = pair
    for model, key in ((finetuned, "finetuned"), (pretrained, "pretrained")):
        assert isinstance(model, dgfast.DiT)
        assert not any(m.training for m in model.modules())
        cfg = info[key]["config"]
        assert model.config["hidden_size"] == cfg["hidden_size"] and model.config["depth"] == cfg["depth"]
        assert model.num_table_rows == cfg["num_classes"] + 1  # label dropout kept: a null row
        assert info[key]["null_label"] == cfg["num_classes"]
        assert model.in_channels == data.CHANNELS and model.input_size == data.IMAGE_SIZE and model.learn_sigma
    assert info["finetuned"]["config"]["num_classes"] == len(data.TARGET_DIGITS)
    assert info["pretrained"]["config"]["num_classes"] == 10
    assert info["finetuned"]["classes"] == [str(d) for d in data.TARGET_DIGITS]
    # the fine-tune changed the weights (a copy would make DoG a no-op)
    w_ft = finetuned.blocks[0].attn.qkv.weight
    w_pre = pretrained.blocks[0].attn.qkv.weight
    assert w_ft.shape == w_pre.shape and not torch.equal(w_ft, w_pre)


def test_quick_dog_sample(pair):
    finetuned, pretrained, info = pair
    torch.manual_seed(0)
    size, channels = info["image"]["size"], info["image"]["channels"]
    z = torch.randn(2, channels, size, size)
    y = torch.tensor([0, 4])
    x = dgfast.sample(finetuned, pretrained, z, y, guidance_scale=2.0, steps="5", guidance_channels="all",
                      null_label=info["pretrained"]["null_label"])
    assert x.shape == (2, channels, size, size) and torch.isfinite(x).all()
    x1 = dgfast.sample(finetuned, None, z, y, guidance_scale=1.0, steps="5", guidance_channels="all")
    assert not torch.equal(x, x1)


def test_frechet_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    mu, sig = metrics.gaussian_stats(a)
    assert metrics.frechet_distance(mu, sig, mu, sig) == pytest.approx(0.0, abs=1e-8)
    # N(0, I) vs N(m, 4I) in d dims: |m|^2 + d * (1 + 4 - 2 * 2)
    d2 = metrics.frechet_distance(np.zeros(3), np.eye(3), np.ones(3), 4 * np.eye(3))
    assert d2 == pytest.approx(3 + 3 * 1.0)


def test_metric_separates_domains():
    """The encoder features see the domain shift: source-style renders of the target digits are far
    from the held-out target set, fresh target-style renders of the train glyphs are close."""
    metric = metrics.load_metric()
    dom = data.Domains()
    g = torch.Generator().manual_seed(0)
    idx = dom.train_idx[np.isin(dom.digits[dom.train_idx], data.TARGET_DIGITS)][:400]
    labels = torch.tensor([data.TARGET_DIGITS.index(int(d)) for d in dom.digits[idx]])
    same = metric(data.render(dom.glyphs[idx], **data.target_style(len(idx), g)), labels)
    other = metric(data.render(dom.glyphs[idx], **data.source_style(len(idx), g)), labels)
    assert same["fd"] * 5 < other["fd"]
    assert same["accuracy"] > 0.9
    # the wash reading: the target's top-to-bottom paper change, which source paper (flat) never has
    assert same["wash"] == pytest.approx(metric.reference_wash, rel=0.1)
    assert other["wash"] < 0.5 * same["wash"]


def test_training_tables_match_the_sampler():
    """The training loss's diffusion is the sampler's: same float64 tables, same float32 rounding."""
    tables = dgfast.Schedule.from_steps("1000").tables
    td = TrainDiffusion()
    for ours, theirs in (("coef1", "posterior_mean_coef1"), ("coef2", "posterior_mean_coef2"),
                         ("post_logvar", "posterior_log_variance_clipped"), ("log_betas", "log_betas"),
                         ("sqrt_recip_ac", "sqrt_recip_alphas_cumprod")):
        assert torch.equal(td.t[ours], torch.from_numpy(tables[theirs]).float()), ours


def test_training_loss_terms():
    td = TrainDiffusion()
    torch.manual_seed(0)
    model = dgfast.DiT(input_size=8, patch_size=4, in_channels=3, hidden_size=32, depth=1, num_heads=2,
                       num_classes=3).set_backend("torch")
    x0 = torch.rand(6, 3, 8, 8) * 2 - 1
    terms = td.training_losses(model, x0, torch.tensor([0, 1, 2, 0, 1, 3]), torch.Generator().manual_seed(0))
    assert set(terms) == {"loss", "mse", "vb"} and terms["loss"].shape == (6,)
    assert torch.isfinite(terms["loss"]).all()
    terms["loss"].mean().backward()  # the zero-initialised output layer gets a gradient
    assert model.final_layer.linear.weight.grad.abs().sum() > 0


def test_demo_quick(tmp_path):
    from dgfast.zoo import demo
    from PIL import Image
    out = tmp_path / "demo"
    assert demo.main(["--quick", "--out", str(out)]) == 0
    img = Image.open(out / "grid.png")
    assert img.size[0] > img.size[1] > 0
    report = json.loads((out / "demo.json").read_text())
    assert set(report["quality"]) == {"finetuned", "cfg", "dog"}
    assert report["throughput"]["dgfast_samples_per_s"] > 0
    assert report["throughput"]["max_abs_diff_vs_reference"] < 1e-3
    assert report["null_labels"] == {"cfg": 5, "dog": 10}


def test_demo_arguments_register_on_a_subparser():
    import argparse
    from dgfast.zoo import demo
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd")
    demo.add_arguments(sub.add_parser("demo"))
    args = parser.parse_args(["demo", "--quick", "--out", "x"])
    assert args.quick and args.out == "x" and args.per_class == 8


def test_finetune_starts_from_the_pretrained_rows():
    """The fine-tune's label table: target class k starts as the pre-trained row of digit
    TARGET_DIGITS[k], the null row is new (DiT's init, std 0.02, drawn from the seed); every other
    weight is copied."""
    from dgfast.zoo import train
    torch.manual_seed(0)
    pre = train.build_dit(10)
    with torch.no_grad():
        pre.y_embedder.embedding_table.weight.normal_()
    ft = train.finetune_from(pre, data.TARGET_DIGITS, seed=1)
    table_pre, table_ft = pre.y_embedder.embedding_table.weight, ft.y_embedder.embedding_table.weight
    assert table_ft.shape == (len(data.TARGET_DIGITS) + 1, table_pre.shape[1])
    for k, digit in enumerate(data.TARGET_DIGITS):
        assert torch.equal(table_ft[k], table_pre[digit])
    assert not torch.allclose(table_ft[-1], table_pre[10])
    assert 0.01 < table_ft[-1].std() < 0.03
    again = train.finetune_from(pre, data.TARGET_DIGITS, seed=1).y_embedder.embedding_table.weight
    assert torch.equal(again, table_ft)
    for (name, a), b in zip(pre.state_dict().items(), ft.state_dict().values()):
        if not name.startswith("y_embedder"):
            assert torch.equal(a, b), name
    assert ft.y_embedder.num_classes == len(data.TARGET_DIGITS)


@pytest.mark.parametrize("argv, flag", [
    (["--per-class", "0"], "--per-class"), (["--per-class", "-2"], "--per-class"),
    (["--quality-samples", "1"], "--quality-samples"), (["--seed", "-5"], "--seed"),
    (["--quick", "--steps", "abc"], "--steps"), (["--zoo-dir", "/nonexistent"], "--zoo-dir"),
])
def test_demo_bad_arguments_are_one_line_errors(argv, flag, capsys):
    from dgfast.zoo import demo
    with pytest.raises(SystemExit) as exit_info:
        demo.main(argv + ["--out", "/nonexistent/never-written"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("python -m dgfast.zoo.demo: error: " + flag), err


def test_demo_quick_keeps_an_explicit_steps():
    import argparse
    from dgfast.zoo import demo
    parse = demo.add_arguments(argparse.ArgumentParser()).parse_args
    args = parse(["--quick", "--steps", "7"])
    demo.check_args(args)
    assert args.steps == "7" and args.per_class == 2
    args = parse(["--quick"])
    demo.check_args(args)
    assert args.steps == "5"
    args = parse([])
    demo.check_args(args)
    assert args.steps == "50" and args.per_class == 8


@pytest.mark.parametrize("argv, flag", [
    (["--samples", "0"], "--samples"), (["--samples", "1"], "--samples"), (["--steps", "0"], "--steps"),
    (["--zoo-dir", "/nonexistent"], "--zoo-dir"), (["--threads", "0"], "--threads"),
    (["--seeds", "-1"], "--seeds"), (["--out", "x", "--update-shipped"], "--out and --update-shipped"),
])
def test_evaluate_bad_arguments_are_one_line_errors(argv, flag, capsys):
    from dgfast.zoo import evaluate
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("python -m dgfast.zoo.evaluate: error: " + flag), err


def test_evaluate_writes_outside_the_package_unless_asked(tmp_path, monkeypatch):
    from dgfast.zoo import evaluate
    monkeypatch.chdir(tmp_path)
    assert evaluate.output_dir(None, False) == "zoo-eval"
    assert evaluate.output_dir(str(tmp_path / "o"), False) == str(tmp_path / "o")
    assert evaluate.output_dir(None, True) == zoo.ZOO_DIR
    # --markdown-only rewrites RESULTS.md next to the results.json it reads, here a copy
    out = tmp_path / "copy"
    out.mkdir()
    (out / "results.json").write_text(open(os.path.join(zoo.ZOO_DIR, "results.json")).read())
    shipped = open(os.path.join(zoo.ZOO_DIR, "RESULTS.md")).read()
    assert evaluate.main(["--markdown-only", "--out", str(out)]) == 0
    assert (out / "RESULTS.md").read_text().startswith("# Embedded pair")
    assert open(os.path.join(zoo.ZOO_DIR, "RESULTS.md")).read() == shipped


def test_evaluate_fd_change_says_higher_when_worse():
    from dgfast.zoo.evaluate import fd_change
    assert fd_change(57.792, 36.887) == "56.7% higher"
    assert fd_change(30.0, 40.0) == "25.0% lower"


def test_evaluate_jobs_makes_the_table_of_one_process(tmp_path):
    """--jobs samples each seed in its own process and merges them: every row's values, seed by seed,
    are those one process makes (same per-sample noise; the GEMM strategies, which each process would
    measure for itself (dgfast.gemm_choice), come from one disk cache), and an --every row is scored
    once, by the parent, at the best scale over all seeds."""
    import subprocess
    import sys
    common = ["--samples", "3", "--steps", "2", "--scales", "1.5", "3", "--interval-scales", "--seeds", "0", "1",
              "--threads", "1"]
    runs = {}
    for name, extra in (("one", ["--every"]), ("jobs", ["--jobs", "2", "--every", "2"])):
        out = tmp_path / name
        env = dict(os.environ, DGFAST_GEMM_CACHE=str(tmp_path / "gemm_choice.json"))
        subprocess.run([sys.executable, "-m", "dgfast.zoo.evaluate", *common, *extra, "--out", str(out)],
                       check=True, capture_output=True, text=True, env=env)
        runs[name] = json.loads((out / "results.json").read_text())
    one, jobs = runs["one"]["per_seed"], runs["jobs"]["per_seed"]
    every = [k for k in jobs if " every " in k]
    assert len(every) == 1 and len(jobs[every[0]]) == 2
    assert list(one) == [k for k in jobs if k not in every]
    for key, rows in one.items():
        assert [r["fd"] for r in rows] == pytest.approx([r["fd"] for r in jobs[key]], rel=1e-6), key
        assert [r["accuracy"] for r in rows] == pytest.approx([r["accuracy"] for r in jobs[key]], nan_ok=True), key
    assert runs["jobs"]["setup"]["jobs"] == 2 and "2 processes" in (tmp_path / "jobs" / "RESULTS.md").read_text()


def test_train_makes_the_same_bytes_in_every_process(tmp_path):
    """python -m dgfast.zoo.train is reproducible: two processes (torch seeds its default generator
    anew in each) write byte-identical weights. The shipped pre-trained model was once trained with an
    unseeded init, which made the recipe unreproducible; this fails on such a draw."""
    import subprocess
    import sys
    for run in ("a", "b"):
        subprocess.run([sys.executable, "-m", "dgfast.zoo.train", "--quick", "--threads", "1",
                        "--out", str(tmp_path / run)], check=True, capture_output=True, text=True)
    for name in ("pretrained", "finetuned", "encoder"):
        a, b = (tmp_path / run / f"{name}.safetensors" for run in ("a", "b"))
        assert a.read_bytes() == b.read_bytes(), name


def test_evaluate_jobs_names_the_seed_whose_process_failed(tmp_path, monkeypatch, capsys):
    from dgfast.zoo import evaluate
    real = evaluate.child_argv
    monkeypatch.setattr(evaluate, "child_argv",  # seed 1's process gets a bad flag and exits 2
                        lambda args, seed, out: real(args, seed, out) + (["--samples", "0"] if seed == 1 else []))
    argv = ["--samples", "3", "--steps", "2", "--scales", "2", "--interval-scales", "--every", "--seeds", "0", "1",
            "--jobs", "2", "--out", str(tmp_path / "o")]
    assert evaluate.main(argv) == 1
    assert "the process of seed 1 failed (exit 2)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
