"""Data parallelism on torch.distributed (gloo, 2 CPU processes): losses whose normaliser spans
ranks (token-mean cross-entropy, GRPO / DAPO / BNPO counts, KTO's batch KL, BCO's running mean)
with ``alignops.distributed`` counts or ``process_group=``: the ranks' loss shares and gradients
add up to the single-process float64 run of the whole batch, with one rank fully ignored."""

from _distributed import run
from _distributed_dp_cases import dp_cases


def test_data_parallel_normalisers():
    run(2, dp_cases)
