"""Evaluation (docs/method.md step 5): the eval_scores asset (``asset``), pairwise judging
(``judging``, ``annotators``), win rates and the length-controlled win rate (``win_rates``,
``lc``) and the data analyses of BFT section 5 (``data_metrics``)."""
