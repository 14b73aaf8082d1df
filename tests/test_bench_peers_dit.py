"""benchmarks/bench_peers_dit.py: the peer choice and verdict rule, the cache plumbing, a --quick run."""

import re

import pytest
import torch

from mmaccel.benchmarks import bench_peers_dit as bench
from mmaccel.benchmarks.bench_peers_dit import OURS, PEER, Scored, best_peer, verdict


def _s(name, kind, speed, db, lo=None, hi=None):
    return Scored(name, kind, speed, speed if lo is None else lo, speed if hi is None else hi, db)


def test_best_peer_is_the_fastest_at_matched_quality():
    ours = _s("td", OURS, 1.5, 30.0)
    rows = [ours, _s("fast-bad", PEER, 3.0, 20.0), _s("ok", PEER, 1.2, 29.8), _s("good", PEER, 1.1, 40.0),
            _s("other-ours", OURS, 9.0, 50.0)]  # fmt: skip
    peer, matched = best_peer(ours, rows)
    assert (peer.name, matched) == ("ok", True)  # 29.8 dB is within 0.5 dB; 20 dB is not; ours never count
    assert verdict(ours, peer, matched) == "ahead by 1.25x"  # 0.2 dB apart: matched
    # a faster row whose best peer is far better in quality is not simply ahead
    assert verdict(ours, rows[3], True) == "ahead by 1.36x, at 10.0 dB lower quality"
    slower = _s("td", OURS, 1.0, 30.0, 0.9, 1.1)
    assert verdict(slower, _s("ok", PEER, 1.05, 30.3, 1.0, 1.2), True) == "behind by 1.05x (within spread)"


def test_best_peer_without_a_match_is_the_nearest_quality_and_says_so():
    ours = _s("flexdit", OURS, 2.0, 45.0)
    rows = [ours, _s("a", PEER, 1.5, 30.0), _s("b", PEER, 1.1, 40.0)]
    peer, matched = best_peer(ours, rows)
    assert (peer.name, matched) == ("b", False)
    assert verdict(ours, peer, matched) == "ahead by 1.82x, at 5.0 dB higher quality"
    assert best_peer(ours, [ours]) is None


def test_caches_are_removed_and_mag_ratios_calibrated():
    setup = bench._dit(quick=True)
    dense = setup.sample(setup.model)
    ratios = bench.calibrate_mag_ratios(setup)
    assert len(ratios) == setup.steps and ratios[0] == 1.0 and all(r > 0 for r in ratios)
    from diffusers.hooks import FirstBlockCacheConfig

    with bench._cache(setup.model, FirstBlockCacheConfig(threshold=1e9)):  # skips every step after the first
        cached = setup.sample(setup.model)
    assert not torch.allclose(cached, dense)
    torch.testing.assert_close(setup.sample(setup.model), dense, rtol=0, atol=0)
    assert not setup.model.transformer_blocks[0]._diffusers_hook.hooks


def _rows(section: str) -> dict[str, list[str]]:
    lines = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    return {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines)}


@pytest.mark.parametrize("only", ["dit", pytest.param("pixart", marks=pytest.mark.slow),
                                  pytest.param("wan", marks=pytest.mark.slow),
                                  pytest.param("wan-large", marks=pytest.mark.slow)])  # fmt: skip
def test_quick_run_prints_spreads_fidelity_and_verdicts(only):
    text = bench.main(["--quick", "--only", only])
    assert re.search(r"Machine: .*torch threads \d+, load average at start [\d.]+ / ", text)
    rows = _rows(text)
    assert rows["dense"][4] == "1.00x (ref)" and rows["dense"][7] == "inf"
    for name, cells in rows.items():
        if name != "dense":
            assert re.fullmatch(r"\d+\.\d\dx \(\d+\.\d\d-\d+\.\d\d\)( ~noise)?", cells[4]), cells
        if cells[1] == OURS:
            assert re.match(r"(ahead|behind) by \d+\.\d\dx", cells[10]), cells
    assert rows["ToMe (tomesd rule)"][6] == "0.50"  # ratio 0.5 in every block, every step
    assert float(rows["token density"][6]) < 1
    assert rows["FirstBlockCache"][5].endswith(f"/{4}")
    assert ("FlexDiT" in rows) == (only not in ("wan", "wan-large"))
    assert rows[bench.FAST_ROW][1] == OURS  # the fast preset, in the same run as ToMe + MagCache and MagCache
    assert "ToMe + MagCache" in rows and "MagCache" in rows


def test_breakdown_sorts_forwards_into_dense_reduced_and_skipped():
    """``--breakdown``: every forward of a row is timed, its FLOPs counted, and sorted; the dense
    row runs the blocks at every step on all tokens, ToMe at every step on half, MagCache skips
    (a skipped-forward time, fewer FLOPs) and the fast preset's first forward is dense."""
    text = bench.main(["--quick", "--breakdown", "--only", "dit"])
    rows = _rows(text)
    assert set(rows) == set(bench.BREAKDOWN_ROWS)
    dense = rows["dense"]
    assert dense[1] == "4/4: steps 0, 1, 2, 3" and dense[5] == "-" and dense[6] == "-" and "(" in dense[4]
    assert dense[8] == "1.00x" and dense[9] == "1.00x" and dense[10] == "inf"
    assert rows["ToMe (tomesd rule)"][2] == "0.50, 0.50, 0.50, 0.50" and rows["ToMe (tomesd rule)"][4] == "-"
    for name in ("MagCache", "ToMe + MagCache", bench.FAST_ROW):
        n = int(rows[name][1].split("/")[0])
        assert 1 <= n < 4 and rows[name][6] != "-", rows[name]  # the cache skipped at least one forward
        assert rows[name][1].split(": ")[1].startswith("steps 0")  # MagCache's retention: the first step runs
        assert float(rows[name][8].rstrip("x")) > 1.0  # a skipped forward counts (almost) no FLOPs
    assert rows[bench.FAST_ROW][2].startswith("1.00")  # DiT's preset: dense until progress 0.7
    assert float(rows["ToMe (tomesd rule)"][8].rstrip("x")) > 1.0


def test_wan_large_setting_has_the_480p_aspect_and_more_tokens():
    """``--only wan-large``: the Wan 480p latent aspect at 4,032 tokens, 6 steps, with the issue #28 target."""
    assert bench.WAN_LARGE_LATENT[2:] == (4, 48, 84) and abs(84 / 48 - 104 / 60) < 0.05
    tokens = bench.WAN_LARGE_LATENT[2] * bench.WAN_LARGE_LATENT[3] * bench.WAN_LARGE_LATENT[4] // 4
    assert tokens == 4032 and "Wan large" in bench.TARGETS
    setup = bench._wan_large(quick=True)
    assert setup.name == "Wan large" and setup.factor == (1, 2, 2) and "16x2x16x24 = 192 tokens" in setup.shape
