using System.CommandLine;
using LoraMix.Cli;

return CliApp.Run(args);
