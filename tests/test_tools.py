"""The everyday tools, on tiny fake data: the inference model.pt, --eval-only, your own images (--dataset folder),
bench/plot.py, --tensorboard and the end-of-run summary line."""

import json
import shutil

import numpy as np
import plot
import pytest
import torch
from PIL import Image
from scriptrun import TINY, refused, rows, run_inprocess
from test_robust import files

import common


@pytest.fixture(scope="module")
def tiny_run(data_dir, tmp_path_factory):
    """A finished 6-step supervised run and the script's globals (its EMA model, data, ...)."""
    run_dir = tmp_path_factory.mktemp("tools") / "run"
    g = run_inprocess("supervised.py", *TINY, "--data-dir", data_dir, "--total-steps", 6, "--run-dir", run_dir)
    return run_dir, g


def load_model(path):
    """The README's lines (Evaluate and load a model): model.pt back to a network and its input normalisation."""
    m = torch.load(path, weights_only=True)
    net = common.WideResNet(**m["arch"]).eval()
    net.load_state_dict(m["weights"])
    mean, std = (torch.tensor(v).view(-1, 1, 1) for v in (m["mean"], m["std"]))
    return net, lambda x: (x.float() / 255 - mean) / std, m


def test_model_pt_is_the_evaluated_network(tiny_run):
    run_dir, g = tiny_run
    net, prep, m = load_model(run_dir / "model.pt")
    assert m["script"] == "supervised" and m["step"] == 6 and m["size"] == 28
    x = g["data"].x_test[:16]  # uint8 (N, 1, 28, 28)
    with torch.no_grad():
        expected = g["ema_model"](common.normalize(x, g["info"]))
        assert torch.allclose(net(prep(x)), expected, atol=1e-5)


def test_model_pt_leaves_out_the_heads_only_the_method_uses(data_dir, tmp_path):
    """DST's pseudo and worst-case heads are not part of the evaluated network: model.pt loads strictly."""
    run_inprocess("dst.py", *TINY, "--data-dir", data_dir, "--total-steps", 1, "--mu", 1, "--run-dir", tmp_path / "r")
    net, _, m = load_model(tmp_path / "r" / "model.pt")
    assert not any("head" in k for k in m["weights"]) and m["arch"]["num_classes"] == 10


def test_eval_only_prints_the_checkpoints_accuracy_and_writes_nothing(tiny_run, capsys):
    run_dir, _ = tiny_run
    before = files(run_dir)
    with pytest.raises(SystemExit) as e:
        run_inprocess("supervised.py", "--resume", run_dir, "--eval-only")
    out = capsys.readouterr().out.strip().splitlines()[-1]
    last = [r for r in rows(run_dir) if "eval/acc" in r][-1]
    assert (
        e.value.code == 0 and f"step 6 | eval acc {last['eval/acc']:.2f} (raw model {last['eval/acc_raw']:.2f})" in out
    )
    assert files(run_dir) == before


def test_tensorboard_and_the_summary_line(data_dir, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_inprocess(
        "supervised.py", *TINY, "--data-dir", data_dir, "--total-steps", 4, "--run-dir", tmp_path, "--tensorboard"
    )
    events = EventAccumulator(str(tmp_path)).Reload()
    assert {"eval/acc", "losses/total"} <= set(events.Tags()["scalars"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("done: step 4 | eval acc") and str(tmp_path) in last


def make_folder(root, classes=("cat", "dog", "frog"), n_train=4, n_test=2, n_unlabeled=3):
    """root/train/<class>/*.png, root/test/<class>/*.png, root/unlabeled/sub/*.png; mixed sizes and modes."""
    g = torch.Generator().manual_seed(0)
    pixels = lambda h, w, c: torch.randint(0, 256, (h, w, c), generator=g, dtype=torch.uint8).squeeze(-1).numpy()
    for split, n in (("train", n_train), ("test", n_test)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(pixels(10, 10 + 2 * (i % 2), 3)).save(root / split / c / f"{i}.png")
    (root / "unlabeled" / "sub").mkdir(parents=True)
    for i in range(n_unlabeled):
        Image.fromarray(pixels(14, 14, 1)).save(root / "unlabeled" / "sub" / f"{i}.png")  # greyscale
    return root


def test_folder_dataset_loads_resized_rgb_images(tmp_path):
    root = make_folder(tmp_path)
    train_x, train_y, test_x, test_y, extra_x, info = common.load_folder(root)
    assert train_x.shape == (12, 3, 10, 10) and test_x.shape == (6, 3, 10, 10) and extra_x.shape == (3, 3, 10, 10)
    assert train_x.dtype == torch.uint8 and train_y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert test_y.tolist() == [0, 0, 1, 1, 2, 2]
    assert info.classes == ("cat", "dog", "frog") and info.num_classes == 3 and info.size == 10 and info.channels == 3
    assert torch.equal(extra_x[:, 0], extra_x[:, 1])  # greyscale made RGB
    pixels = train_x.float().div(255)
    assert torch.allclose(torch.tensor(info.mean), pixels.mean((0, 2, 3)), atol=1e-5)
    first = torch.from_numpy(np.array(Image.open(root / "train" / "cat" / "0.png"))).permute(2, 0, 1)
    assert torch.equal(train_x[0], first)  # already 10 x 10: unchanged


def test_a_method_trains_on_a_folder_and_model_pt_names_the_classes(tmp_path):
    root = make_folder(tmp_path / "images")
    g = run_inprocess(
        "flexmatch.py",
        "--dataset",
        "folder",
        "--data-dir",
        root,
        "--num-labels",
        6,
        "--depth",
        10,
        "--width",
        1,
        "--batch-size",
        4,
        "--mu",
        2,
        "--bn-momentum",
        0.1,
        "--device",
        "cpu",
        "--total-steps",
        2,
        "--log-every",
        2,
        "--run-dir",
        tmp_path / "run",
    )
    assert len(g["data"].x_unlabeled) == 12 + 3  # the training images and the unlabeled folder
    assert len(json.loads((tmp_path / "run" / "labeled_indices.json").read_text())) == 6
    assert torch.load(tmp_path / "run" / "model.pt", weights_only=True)["classes"] == ["cat", "dog", "frog"]


BAD_FOLDERS = {
    "no test folder": (lambda r: shutil.rmtree(r / "test"), "no folder"),
    "other classes in test": (lambda r: (r / "test" / "frog").rename(r / "test" / "toad"), "same class folders"),
    "a class without images": (lambda r: [p.unlink() for p in (r / "train" / "dog").iterdir()], "Found no valid file"),
    "an empty unlabeled folder": (
        lambda r: [p.unlink() for p in (r / "unlabeled" / "sub").iterdir()],
        "holds no images",
    ),
    "a broken image": (lambda r: (r / "train" / "dog" / "1.png").write_bytes(b"not a png"), "cannot read"),
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_bad_folder_layouts_are_one_line(case, tmp_path):
    root = make_folder(tmp_path)
    change, message = BAD_FOLDERS[case]
    change(root)
    with pytest.raises(ValueError) as e:
        common.load_folder(root)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_bad_folder_stops_a_script_in_one_line(tmp_path, capsys):
    root = make_folder(tmp_path / "images")
    (root / "test" / "frog").rename(root / "test" / "toad")
    refused(
        capsys,
        "supervised.py",
        "--dataset",
        "folder",
        "--data-dir",
        root,
        "--num-labels",
        3,
        "--device",
        "cpu",
        "--run-dir",
        tmp_path / "run",
    )
    assert not (tmp_path / "run").exists()


def test_plot_draws_accuracy_and_losses_of_several_runs(tiny_run, tmp_path, capsys):
    run_dir, _ = tiny_run
    other = tmp_path / "other"
    other.mkdir()
    lines = [
        '{"step": 2, "losses/total": 1.5}',
        '{"step": 2, "eval/acc": 10, "eval/loss": null}',
        '{"st',
    ]  # null, a cut line
    (other / "metrics.jsonl").write_text("\n".join(lines))
    plot.main([str(run_dir), str(other), "--out", str(tmp_path / "c.png")])
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG" and "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        plot.main([str(tmp_path / "nothing"), "--out", str(tmp_path / "d.png")])
    assert e.value.code == 2 and not (tmp_path / "d.png").exists()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # matplotlib's own ValueError was a traceback
        plot.main([str(run_dir), "--out", str(tmp_path / "d.xyz")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "end the name in .avif, .eps" in err, err
