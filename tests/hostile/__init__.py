"""The hostile inputs of issue 15 and the bounded runner that tries them.

    files.py      hostile rule-file text, generated (alias bombs, deep nesting, globs of many stars)
    workspace.py  one real tiny tuned artifact and training run, copied for each case to damage
    bounded.py    run a call in a forked child under a deadline and a memory bound; classify the end
    corpus.py     the cases, by the issue's probe categories, and what each must do

Used by tests/test_hostile_corpus.py, tests/test_fuzz.py and benchmarks/hostile_probe.py.
"""
