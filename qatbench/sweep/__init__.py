"""A sweep: the trials of one experiment run, resumed, tracked and reported.

``runner`` starts or resumes a sweep; ``loop`` runs its trials through an executor
(``executor`` for local worker processes, ``ray_executor`` for a Ray cluster, reached or
started by ``ray_instance``); ``folders`` owns the run folders; ``outcome`` what a sweep
leaves behind; ``signals`` Ctrl-C and SIGTERM.
"""
