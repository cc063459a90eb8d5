"""pytest (nbval) collection for the labs.

The student notebooks in this folder (labN_*.ipynb) end at a check cell that fails by design:
their stubs raise NotImplementedError. nbval must not run them; it runs the solved copies in
solutions/ instead, which are the same notebooks with the stubs filled in. tests/test_labs.py
checks that the student notebooks fail the way a student will see them fail.
"""

collect_ignore_glob = ["lab*.ipynb"]
