"""Task folder lmms-eval adds to its search path under ``LMMS_EVAL_PLUGINS=jobs.lmms_plugin``.

It ships no task: LLaVA's benchmarks (VQAv2, GQA, TextVQA, VizWiz, POPE, ScienceQA, MME, MMBench)
are lmms-eval's own tasks; put local task YAMLs here or pass ``--include_path DIR``."""
