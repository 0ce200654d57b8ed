"""Imported once by the fork server of ``tests/_distributed.run``: runs every alignops op of the
distributed tests once on tiny inputs, so the forked ranks inherit a warm interpreter."""

import torch

import alignops

torch.set_num_threads(1)
_h = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
_w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
_x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
_y = torch.tensor([0, 4, -100])
_o = alignops.linear_logprobs(_h, _w, _y, return_entropy=True, return_log_sum_p2=True, topk=2)
_p = alignops.logprobs(_x, _y, return_entropy=True, return_log_sum_p2=True, topk=2)
(_o.logps + _o.entropy + _o.log_sum_p2 + _p.logps + _p.entropy + _p.log_sum_p2).sum().backward()
del _h, _w, _x, _y, _o, _p
