"""End-to-end benchmark: the engine from 1 to 10,000 adapters against HF PEFT and merged weights.

``lora-cluster bench`` / ``benchmarks/e2e.py`` (``bench.cli``) drive ``sweep.run_bench``; the
pieces are usable alone: ``workload`` (Zipf request streams, Poisson arrivals), ``runners``
(closed- and open-loop clients), ``metrics``, ``steptime`` (decode step time), ``hf_baselines``
(PEFT mixed batches, merged weights), ``report`` (table, JSON, PNG), ``presets``, ``assets``.
Nothing is imported here, so the CLI can build its parser without torch.
"""
