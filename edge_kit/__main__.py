from edge_kit.cli import main

raise SystemExit(main())
