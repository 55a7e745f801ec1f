"""Compare review rules on two shift reports' per-image predictions (cadbcnn_train.review_rules):

    cadbcnn-train shift-report MODEL --split val  --predictions --out build/rules/NAME-val  …
    cadbcnn-train shift-report MODEL --split test --predictions --out build/rules/NAME-test …
    .venv/bin/python scripts/review_rules.py build/rules/NAME-val build/rules/NAME-test --out docs/shift/rules-NAME

Rules are fitted on the first (validation) report and scored on the second; nothing runs the model again.
"""

import sys

from cadbcnn_train.review_rules import main

if __name__ == "__main__":
    sys.exit(main())
