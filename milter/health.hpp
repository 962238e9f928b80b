// `paas-milter health`: is the milter answering? For container health checks and
// monitoring: connect to milter.socket, negotiate options as Postfix does, say QUIT.
#pragma once

namespace paasmilter {

// Runs `paas-milter health` with the arguments after "health" (ARGC/ARGV, ARGV not
// including the command itself). Prints one "OK" line on stdout and returns 0 when the
// milter answered the option negotiation; else prints why on stderr and returns 1 (also for
// usage errors: container engines reserve health-check exit code 2).
int command_health(int argc, char** argv, const char* default_config);

}  // namespace paasmilter
