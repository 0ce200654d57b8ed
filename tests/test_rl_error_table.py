"""The RL catalog's options, each with its formula, its test and its largest error against the
float64 reference, in float64 and with float32 inputs (the reference then runs in float64 on the
same rounded values). ``python -m pytest tests/test_rl_error_table.py -s`` prints the table.

The error of a run is the largest ``|ours - ref| / max(1, |ref|)`` over its loss, per-token (or
per-row) losses and gradients under random upstream gradients (advantages, weights: their values).
Every row runs the same runner its own test asserts; here each is also asserted in float32.
"""

from __future__ import annotations

import test_losses_policy_variants as pv
import test_rl_corrections as rc
import torch
from _inputs import F64, generator
from _policy_refs import max_error
from test_losses_binary import run_vanilla_kto
from test_losses_reference_free import run_simpo_hinge
from test_rl_advantages import (
    ref_grpo_adv,
    ref_opo_adv,
    ref_passk_adv,
    ref_reinforce_pp,
    ref_rloo_adv,
    uneven_batch,
)

from alignops.rl import (
    group_advantages,
    opo_advantages,
    passk_advantages,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    remax_advantages,
    rloo_advantages,
)

# float32 inputs are upcast and computed in float32: a relative error of a few float32 ulps per
# operation; float64 runs agree to rounding.
F32_BOUND = 1e-5
F64_BOUND = 1e-12


def _adv_runner(label, ours, ref, *, lengths=False, **kw):
    def run(dtype):
        ids, r, n = uneven_batch(seed=21)
        r = r.to(dtype)
        args = (r, n) if lengths else (r,)
        refs = (r.double(), ids, n) if lengths else (r.double(), ids)
        return [(label, ref(*refs, **kw), ours(*args, group_ids=ids, **kw_ours(kw)))]

    return run


def kw_ours(kw):
    rename = {"scale": "scale_rewards", "single": "single_completion"}
    return {rename.get(k, k): v for k, v in kw.items()}


def _remax(dtype):
    g = generator(22)
    r = torch.randn(12, generator=g, dtype=F64).to(dtype)
    greedy = torch.randn(4, generator=g, dtype=F64).repeat_interleave(3).to(dtype)
    return [("remax", r.double() - greedy.double(), remax_advantages(r, greedy))]


def _reinforce_pp(dtype):
    g = generator(23)
    mask = torch.rand(6, 10, generator=g) > 0.25
    rewards = (0.2 * torch.randn(6, 10, generator=g, dtype=F64)).to(dtype)
    want = ref_reinforce_pp(rewards.double(), mask, 0.95)
    return [("reinforce++", want, reinforce_pp_advantages(rewards, mask, gamma=0.95))]


def _reinforce_pp_baseline(dtype):
    ids, r, _ = uneven_batch(seed=24)
    r = r.to(dtype)
    mask = torch.rand(r.shape[0], 9, generator=generator(25)) > 0.3
    keep = mask & ~torch.isnan(r)[:, None]
    centred = torch.zeros(r.shape[0], dtype=F64)
    for k in ids.unique():
        rows_k = ((ids == k) & ~torch.isnan(r)).nonzero().squeeze(-1)
        centred[rows_k] = r[rows_k].double() - r[rows_k].double().mean()
    tok = centred[:, None].expand_as(mask)
    vals = tok[keep]
    want = torch.where(keep, (tok - vals.mean()) / torch.sqrt(vals.var() + 1e-8), torch.zeros_like(tok))
    return [("reinforce++ baseline", want, reinforce_pp_baseline_advantages(r, mask, group_ids=ids))]


def row(option: str, formula: str, test: str, *runners):
    """One line of the table: every pair of every runner."""
    return option, formula, test, lambda dtype: [p for run in runners for p in run(dtype)]


AGG_FORMULAS = {
    "token-mean": "sum L / N_tok",
    "seq-mean-token-sum": "sum_i sum_t L / N_seq",
    "seq-mean-token-mean": "sum_i mean_t L / N_seq",
    "seq-mean-token-sum-norm": "sum L / (N_seq H)",
}
ALL_AGG = [
    (loss, over, n)
    for loss in ("grpo", "ppo", "gmpo", "rloo")
    for over in ("all", "nonempty")
    for n in (0, 1)
]
DUAL, KL, RO = "test_dual_clip_vs_float64", "test_kl_estimators_in_losses_vs_float64", "rollout_correction"
ROWS = [
    row("clip_ratio_c (grpo_loss)", "min(L, -c A) where A < 0", DUAL, pv.run_dual_clip("grpo")),
    row("clip_ratio_c (ppo_loss)", "min(pg, -c A) where A < 0", DUAL, pv.run_dual_clip("ppo")),
    row("clip_ratio_c (rloo_loss)", "min(L_i, -c A_i) where A < 0", DUAL, pv.run_dual_clip("rloo")),
    row(
        "ppo_loss cliprange_high",
        "clip(rho, 1 - lo, 1 + hi)",
        "test_ppo_low_high_clip_vs_float64",
        pv.run_ppo_low_high,
    ),
    row(
        "cispo=CISPOOptions(min, max)",
        "-sg(clip(w, min, max)) A logp",
        "test_cispo_bounds_vs_float64",
        pv.run_cispo_bounds,
    ),
    row(
        "clip_cov (all candidates)",
        "L = 0 on lower < cov < upper",
        "test_clip_cov_vs_float64",
        pv.run_clip_cov(1),
    ),
    row(
        "clip_cov (seeded draw)",
        "random ratio of the candidates",
        "test_clip_cov_vs_float64",
        pv.run_clip_cov(0.1),
    ),
    row("kl_cov (token)", "-w A + coef abs(d) on top cov", "test_kl_cov_vs_float64", pv.run_kl_cov("token")),
    row(
        "kl_cov (sequence ratio)",
        "-w_seq A + coef abs(d) on top cov",
        "test_kl_cov_vs_float64",
        pv.run_kl_cov("sequence"),
    ),
    *[
        row(
            f"kl_estimator={c} (grpo, ppo)",
            "+ beta kl_t (x w in grpo)",
            KL,
            pv.run_kl_estimator("grpo", c),
            pv.run_kl_estimator("ppo", c),
        )
        for c in pv.KL_CASES
    ],
    *[
        row(
            f"loss_agg_mode={mode} (4 losses, all / nonempty rows)",
            AGG_FORMULAS[mode],
            "test_loss_agg_modes_vs_float64",
            *[pv.run_agg(loss, mode, over, n) for loss, over, n in ALL_AGG],
        )
        for mode in pv.AGG_MODES
    ],
    *[
        row(
            f"{RO} {c} (grpo, ppo)",
            "weight x kept tokens",
            f"test_{RO}_in_losses_vs_float64",
            pv.run_rollout("grpo", c),
            pv.run_rollout("ppo", c),
        )
        for c in pv.ROLLOUT_CASES
    ],
    *[
        row(f"RolloutCorrection {c}", "weights, mask", f"test_{RO}_vs_float64", rc.ROLLOUT_RUNS[c])
        for c in rc.ROLLOUT
    ],
    row(
        "log-ratios +-50, 7 loss types",
        "grpo_loss per type",
        "test_extreme_log_ratios_vs_float64",
        *[pv.run_extreme(t) for t in pv.EXTREME_TYPES],
    ),
    *[
        row(f"kl_estimate kind={c}", "value; k2's grad for +", "test_kl_kinds_vs_float64", rc.KL_RUNS[c])
        for c in rc.KL_RUNS
    ],
    row(
        "group_advantages(group_ids)",
        "(r - mean_g) / (std_g + eps)",
        "test_group_advantages_with_uneven_group_ids",
        _adv_runner("grpo ids", group_advantages, ref_grpo_adv, scale="group"),
    ),
    row(
        "single_completion='reward'",
        "baseline 0, std 1",
        "test_group_advantages_with_uneven_group_ids",
        _adv_runner("grpo single", group_advantages, ref_grpo_adv, scale="group", single="reward"),
    ),
    row(
        "rloo_advantages(group_ids)",
        "R_i - mean_{j != i} R_j",
        "test_rloo_advantages_with_uneven_group_ids",
        _adv_runner("rloo ids", rloo_advantages, ref_rloo_adv),
    ),
    row("remax_advantages", "r - r(greedy)", "test_remax_advantages", _remax),
    row(
        "opo_advantages",
        "r - sum n r / sum n",
        "test_opo_advantages_length_weighted_baseline",
        _adv_runner("opo", opo_advantages, ref_opo_adv, lengths=True),
    ),
    row(
        "passk_advantages",
        "r_max - r_2nd for the best",
        "test_passk_advantages",
        _adv_runner("pass@k", passk_advantages, ref_passk_adv, scale="group"),
    ),
    row("reinforce_pp_advantages", "whiten(return-to-go)", "test_reinforce_pp_advantages", _reinforce_pp),
    row(
        "reinforce_pp_baseline_advantages",
        "whiten_tokens(r - mean_g r)",
        "test_reinforce_pp_baseline_advantages",
        _reinforce_pp_baseline,
    ),
    row(
        "ppo_rewards reward_clip_range",
        "clip(score) at the last token",
        "test_ppo_rewards_reward_clip_vs_float64",
        rc.run_reward_clip,
    ),
    row(
        "simpo_loss(loss_type='hinge')",
        "relu(1 - (b dA - g))",
        "test_simpo_hinge_vs_float64",
        run_simpo_hinge,
    ),
    row(
        "kto_loss(loss_type='vanilla')",
        "sig(-b(u - z_other))",
        "test_kto_vanilla_vs_float64",
        run_vanilla_kto(True),
        run_vanilla_kto(False),
    ),
]


def test_error_table_of_every_new_option():
    lines = [
        "| option | formula | test | max err float64 | max err float32 inputs |",
        "| --- | --- | --- | ---: | ---: |",
    ]
    failures = []
    for option, formula, test, run in ROWS:
        _, e64 = max_error(run(F64))
        _, e32 = max_error(run(torch.float32))
        lines.append(f"| {option} | `{formula}` | `{test}` | {e64:.1e} | {e32:.1e} |")
        if not (e64 <= F64_BOUND and e32 <= F32_BOUND):
            failures.append(f"{option}: float64 {e64:.2e}, float32 {e32:.2e}")
    print("\n" + "\n".join(lines))
    assert not failures, failures
