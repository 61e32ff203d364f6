from device_agent.cli import main

raise SystemExit(main())
