"""One replica's engine without Ray: step messages, scheduler, sampler, step runner, rank and
controller cores."""
