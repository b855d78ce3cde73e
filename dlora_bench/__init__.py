"""`dlora-bench`: replay a workload against any OpenAI-compatible server (ours, vLLM, SGLang) at the
trace's arrival times, and write the simulator's results folder, so `dlora-compare` and
`dlora-validate --runtime-folder` read a real engine's run beside a simulated one.

`replay` is the open-loop client (asyncio + httpx), `cli` the Hydra app. Needs neither torch nor SimPy.
"""
