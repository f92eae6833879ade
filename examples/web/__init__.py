"""rowsync's live web demo: a page of people, posts and tags that updates itself.

Run it with ``make demo`` (or ``cd examples && python -m web --help``). Modules: ``database``
(create and fill the demo's database), ``writer`` (random changes), ``view`` (the tree as the
page's keyed nodes, and diffs between two views), ``feed`` (one page's live tree), ``edits``
(the page's edits, written by the server), ``app`` (the Starlette app), ``__main__`` (the
command line).
"""
