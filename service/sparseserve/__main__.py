from sparseserve.cli import main

raise SystemExit(main())
