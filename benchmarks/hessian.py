"""Cost of lambda_max on ResNet-20: HVP vs gradient, and HVPs needed by Lanczos vs power iteration.

    python benchmarks/hessian.py            # batch 128, CIFAR-shaped synthetic input
    python benchmarks/hessian.py --quick    # batch 32, fewer iterations: a fast check
    python benchmarks/hessian.py --device cuda

Measured in the same run, for a model without norm and one with BatchNorm in train mode (batch
statistics part of the function, running statistics frozen), at initialization:
- gradient: one forward + backward of the mean loss (the unit);
- graph: one forward + backward with create_graph (paid once per `hessian_eigs` call off CUDA);
- HVP (reused graph): one double backward through that graph (each product off CUDA);
- HVP (step function): forward, gradient graph and double backward for each product;
- on CUDA, HVP (CUDA graph): the step function replayed from a CUDA graph (each product of
  `hessian_eigs` on CUDA), and gradient (CUDA graph), the unit captured the same way: the HVP
  row also gives its ratio to that (`x graph gradient`);
- check (float64): `HessianOperator.check`, which every Hessian probe runs once by default
  (a float64 HVP and two float64 gradients), also as a multiple of one HVP of the default path
  (`x HVP`: its cost in products);
- HVPs to reach lambda_max within `--tol` (relative) of a reference value (a long Lanczos run),
  for `hessian_eigs(method="lanczos")` and `method="power"`, read off their per-HVP history
  (the reference run's own history serves for Lanczos: the same start vector);
  and the HVPs each method's own stopping rule (relative change < tol) used.
Targets: HVP <= 3x gradient; <= 30 HVPs for lambda_max at 1e-3.
Timings: one warm-up, then the median of `--repeats`.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

# benchmarks/ is on sys.path when run as a script
from _timing import add_json_option, benchmark_device, timed, write_json

from normlab.nn import resnet_cifar
from normlab.probes import hessian_eigs
from normlab.probes._hygiene import frozen_norm_statistics
from normlab.probes.curvature import CAPTURE_WARMUP, hessian_operator
from normlab.train.graphed import CapturedCall

HVP_LABELS = {"reused_graph": "HVP (reused graph)", "step_function": "HVP (step function)",
              "cuda_graph": "HVP (CUDA graph)"}
CHECK_LABEL = "check (float64)"


def gradient(model, x, y, create_graph: bool = False) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    with frozen_norm_statistics(model):
        torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=create_graph)


def hvps_to_reach(history: list[float], reference: float, tol: float) -> int | None:
    """1-based index of the first estimate within `tol` (relative) of `reference`."""
    for i, value in enumerate(history, 1):
        if abs(value - reference) <= tol * abs(reference):
            return i
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--power-iters", type=int, default=40)
    parser.add_argument("--quick", action="store_true", help="batch 32, 2 repeats, 30 iterations")
    parser.add_argument("--device", default="cpu")
    add_json_option(parser)
    args = parser.parse_args()
    batch, repeats, power_iters = ((32, 2, 30) if args.quick
                                   else (args.batch, args.repeats, args.power_iters))
    device = benchmark_device(args.device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    loss_fn = torch.nn.CrossEntropyLoss()
    data = (x, y)
    cuda = device.type == "cuda"
    print(f"ResNet-20, batch {batch}, device {device} ({torch.get_num_threads()} threads), "
          f"train-mode BN, median of {repeats} after warm-up")
    rows = []
    for norm in ("none", "batch"):
        model = resnet_cifar(20, norm=norm, init="kaiming_normal", seed=0).to(device).train()
        seconds = {"gradient": timed(lambda m=model: gradient(m, x, y), repeats, device),
                   "graph (create_graph)": timed(lambda m=model: gradient(m, x, y, True),
                                                 repeats, device)}
        paths = ["reused_graph", "step_function"] + (["cuda_graph"] if cuda else [])
        for path in paths:
            with hessian_operator(model, loss_fn, data, path=path) as op:
                v = torch.randn(op.size, generator=gen, dtype=torch.float64).to(device)
                for _ in range(CAPTURE_WARMUP):  # eager products before the capture
                    op(v)
                seconds[HVP_LABELS[path]] = timed(
                    lambda op=op, v=v: op(v), repeats, device)
        with hessian_operator(model, loss_fn, data, check=False) as op:
            seconds[CHECK_LABEL] = timed(op.check, repeats, device)
        if cuda:
            captured = CapturedCall(lambda m=model: gradient(m, x, y), capture=True,
                                    warmup=CAPTURE_WARMUP, what="the gradient")
            for _ in range(CAPTURE_WARMUP):
                captured()
            seconds["gradient (CUDA graph)"] = timed(captured, repeats, device)
        default_hvp = seconds[HVP_LABELS["cuda_graph" if cuda else "reused_graph"]]
        print(f"\n[{norm}] {'quantity':<22} {'seconds':>9} {'x gradient':>11}"
              + (f" {'x graph gradient':>17}" if cuda else "") + f" {'x HVP':>6}")
        for name, s in seconds.items():
            row = {"norm": norm, "batch": batch, "quantity": name, "seconds": s,
                   "x_gradient": s / seconds["gradient"]}
            if name == HVP_LABELS["cuda_graph"]:
                row["x_graph_gradient"] = s / seconds["gradient (CUDA graph)"]
            if name == CHECK_LABEL:
                row["x_hvp"] = s / default_hvp
            rows.append(row)
            print(f"[{norm}] {name:<22} {s:9.3f} {row['x_gradient']:11.2f}"
                  + (f" {row['x_graph_gradient']:17.2f}" if "x_graph_gradient" in row else
                     f" {'':>17}" if cuda else "")
                  + (f" {row['x_hvp']:6.2f}" if "x_hvp" in row else ""))

        # the long Lanczos run is both the reference and the Lanczos history (same seed)
        lanczos = reference = hessian_eigs(model, loss_fn, data, tol=1e-9, max_iter=60)
        power = hessian_eigs(model, loss_fn, data, method="power", tol=1e-7,
                             max_iter=power_iters)
        stop = {m: hessian_eigs(model, loss_fn, data, method=m, tol=args.tol,
                                max_iter=power_iters) for m in ("lanczos", "power")}
        ref = reference.values[0]
        print(f"[{norm}] reference lambda_max {ref:.6g} (Lanczos, {reference.hvps} HVPs)")
        print(f"[{norm}] {'method':<9} {'HVPs to ' + format(args.tol, 'g'):>12} "
              f"{'stop-rule HVPs':>15} {'stop-rule value':>16} {'rel. error':>11}")
        for name, run in (("lanczos", lanczos), ("power", power)):
            reached = hvps_to_reach(run.history, ref, args.tol)
            own = stop[name]
            print(f"[{norm}] {name:<9} {reached if reached else '>' + str(len(run.history)):>12} "
                  f"{own.hvps:>15} {own.values[0]:16.6g} "
                  f"{abs(own.values[0] - ref) / abs(ref):11.2e}")
            rows.append({"norm": norm, "batch": batch, "method": name, "hvps_to_tol": reached,
                         "tol": args.tol, "stop_rule_hvps": own.hvps})
    write_json(args, "hessian", device, rows)


if __name__ == "__main__":
    main()
