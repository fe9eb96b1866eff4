from ckpt_callbacks._cli._main import main

raise SystemExit(main())
