from campaign_cli.cli.main import main

main()
