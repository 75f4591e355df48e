from aligner_core.cli import main

raise SystemExit(main())
