"""EAGLE3 draft training on the CPU, run as `python -m pyllama4.train_eagle3` (cli.py).

Pipeline, all within one wall-clock budget (--time-budget-min; generation stops at 55% of it,
training at its end): ShareGPT first human turns in the target's chat template are answered
greedily by the target (Engine, fp32; answers cut by the time limit are kept: any prefix of a
greedy answer is one), prompt + answer are prefilled again to capture the target's auxiliary
states (the residual stream entering the draft's aux layers, kept in bf16), and the draft is
trained to predict the target's own next token on answer positions.

Invariants:
- Draft row i (token t[i+1], fused aux of position i) predicts t[i+2]; a row is trained only
  where t[i+2] is an answer token, so the label is the target's greedy argmax there. Labels
  outside the draft vocabulary (the EOS ids and the K most frequent answer tokens of the
  training split, ties broken by frequency in its prompts) carry no loss but count as misses
  in every accuracy.
- Training-time test (SpecForge's unrolling): at step k >= 1 row i takes token t[i+1+k], the
  draft's own prenorm output of step k-1 at row i, position i+k, and predicts t[i+2+k]; its
  query attends to the step-0 keys of positions <= i and to its own keys of steps 1..k, exactly
  what a top-1 chain sees at inference. Gradients flow through the chain; step k's loss has
  weight 0.8**k.
- Sequences are split (seeded) into validation, dev (--val-fraction each) and training. The
  vocabulary and the weights come from training; dev picks which logged interval's weights are
  kept (early stopping: little data overfits fast); validation is measured only at the end.
  Accuracies are per step on the rows where that step's label exists; the accept length
  estimate is 1 + sum over k of the share of rows whose steps 0..k all hit (what greedy
  verification of a top-1 chain accepts), on rows where every step's label exists.
- The saved draft (save_eagle3, SGLang's published layout) loads with load_eagle3;
  train_stats.json beside it records timings, data sizes, the training curve and the
  validation figures.

Modules: data (prompts, answers, the split), capture (the target's aux states), unroll (the
training-time test), metrics (accuracies, accept length), draft (vocabulary and initial draft),
loop (the optimisation), pipeline (all of it in order), cli (the command's arguments).
"""
