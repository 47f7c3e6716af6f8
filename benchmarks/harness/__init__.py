"""What every suite shares: :mod:`.measure` (timing, interleaving, memory), :mod:`.fixtures` (the model and
factor sets the suites measure on, defined once) and :mod:`.results` (result files that carry the machine, the
package versions and the commit; the append-only cell rows of the quality suites). Suites import from here and
never from each other."""
