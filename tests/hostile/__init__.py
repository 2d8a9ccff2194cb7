"""The hostile inputs of issue 15 and the bounded runner that tries them.

    files.py      hostile rule-file text, generated (alias bombs, deep nesting, globs of many stars)
    workspace.py  one real tiny tuned artifact and training run, copied for each case to damage
    bounded.py    run a call in a forked child under a deadline and a memory bound; classify the end
    case.py       a case (what it builds, what the issue promises) and how an outcome is judged
    rule_cases.py hostile rule files; file_cases.py artifacts, checkpoints, data, specs, flags, devices
    corpus.py     every case, by the issue's probe categories
    strategies.py hypothesis strategies for rule files (the fuzzer's)

Used by tests/test_hostile_corpus.py, tests/test_fuzz.py and benchmarks/hostile_probe.py.
"""
