"""`minichat policy check` and `minichat policy diff`: try a policy before deploying it.

* `check.py`: a policy file validated, and what it changes against the version in force (the
  latest version the database's `policy_versions` holds).
* `diff.py`: a dry run of a candidate policy on the real stream. The books are rebuilt from the
  topics into a scratch database (`scratch.py`) by the rebuild (`tools/rebuild`), in the order the
  workers recorded: commands before `--from-time` and from `--to-time` on follow their recorded
  decisions (and policy versions), the commands in between are decided afresh under the
  candidate, with its version, and their turns settle under it. Nothing is produced to Kafka; the
  live database is only read, in read-only transactions (the recorded charges).
* `report.py`: the comparison per tenant, as lines or JSON; `alerts.py`: the alerts it counts.
"""

from minichat.tools.policy_diff.check import CheckResult, check_policy
from minichat.tools.policy_diff.diff import DiffOptions, DiffSetupError, run_diff
from minichat.tools.policy_diff.report import DiffReport

__all__ = ["CheckResult", "DiffOptions", "DiffReport", "DiffSetupError", "check_policy", "run_diff"]
