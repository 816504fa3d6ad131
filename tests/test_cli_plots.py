"""The `nbdiff` dispatcher and `nbdiff show-mask`, through the CLI entry point."""

from nbdiff_megatron.cli import main


def test_show_mask_writes_a_png(tmp_path):
    for kind in ("context_causal", "block_causal", "annealed"):
        out = tmp_path / f"{kind}.png"
        assert (
            main(
                [
                    "show-mask",
                    "--seq-len",
                    "12",
                    "--block-size",
                    "4",
                    "--kind",
                    kind,
                    "--doc-lengths",
                    "5,7",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_show_mask_bad_input_is_one_clear_error(tmp_path, capsys):
    assert (
        main(["show-mask", "--seq-len", "8", "--block-size", "0", "--out", str(tmp_path / "x.png")])
        == 2
    )
    assert "block_size must be an integer >= 1" in capsys.readouterr().err
    assert main(["show-mask", "--seq-len", "8", "--doc-lengths", "3,3"]) == 2
    assert "add up to --seq-len 8" in capsys.readouterr().err


def test_unknown_command_suggests_the_nearest(capsys):
    assert main(["show-mas"]) == 2
    assert "Did you mean 'show-mask'" in capsys.readouterr().err
    assert main([]) == 0


def test_show_curriculum_plots_a_config(tmp_path, capsys):
    out = tmp_path / "cur.png"
    assert (
        main(["show-curriculum", "--config", "examples/ablation_8k.yaml", "--out", str(out)]) == 0
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the Table 2 setting: growth 1 -> 32 finished by step 2500
    assert "block size 1 -> 32 (reached 32 at step ~2500)" in capsys.readouterr().out


def test_show_curriculum_series_follows_the_overrides():
    from nbdiff_megatron.plots import curriculum_series
    from nbdiff_megatron.training.config import load_config

    cfg = load_config(
        "examples/ablation_8k.yaml", ["--curriculum.growth_interval=100", "--train.steps=1000"]
    )
    series = curriculum_series(cfg)
    assert series["step"] == list(range(1, 1001))  # steps k = 1..train.steps, as logged
    assert series["block_size"][98:100] == [1, 2]  # B = 2 from step 100 = growth_interval
    assert all(a <= b for a, b in zip(series["block_size"], series["block_size"][1:]))
