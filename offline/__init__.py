"""Offline tools around the loop: the paper's task-prompt generation and evaluation (pairwise CA
judgement, IFEval). They talk to models over the OpenAI API and never touch the live loop."""
