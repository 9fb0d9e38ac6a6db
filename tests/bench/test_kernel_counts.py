"""bench.engine's census of what inductor generates for one forward (issue 17's kernel figures)."""

from __future__ import annotations

import torch

from bench.engine import _loop_nests, generated_kernels

BODY = """extern "C" void kernel(float* a)
{
    #pragma omp parallel
    {
        {
            #pragma omp for
            for(int64_t x0=0; x0<8; x0+=1)
            {
                for(int64_t x1=0; x1<4; x1+=1)
                {
                    a[x0] += 1;
                }
            }
        }
        {
            for(int64_t x0=0; x0<8; x0+=1)
            {
                a[x0] *= 2;
            }
        }
    }
}"""


def test_loop_nests_counts_outermost_loops_only() -> None:
    assert _loop_nests(BODY) == 2
    assert _loop_nests('extern "C" void kernel()\n{\n}') == 0


def test_a_pointwise_chain_is_one_loop_and_a_global_reduction_adds_one() -> None:
    torch._dynamo.reset()

    def pointwise(x: torch.Tensor) -> torch.Tensor:
        return (x * 2 + 1).relu()

    def normalised(x: torch.Tensor) -> torch.Tensor:
        y = x * 2 + 1
        return y / y.sum()  # a whole-tensor reduction, then a pass that needs its result

    x = torch.randn(8, 16)
    _, calls, loops = generated_kernels(lambda: torch.compile(pointwise)(x))
    assert (calls, loops) == (1, 1)
    _, calls, loops = generated_kernels(lambda: torch.compile(normalised)(x))
    assert calls == 1 and loops == 2
