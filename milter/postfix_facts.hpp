// What `paas-milter check` learns from Postfix: runs postconf (no shell, a timeout) and reads
// the milter_header_checks tables it names, then hands the facts to the pure comparison in
// lib/paasmilter/postfix_check.
#pragma once

#include <chrono>
#include <string>
#include <vector>

#include "paasmilter/config.hpp"
#include "paasmilter/postfix_check.hpp"
#include "paasmilter/result.hpp"

namespace paasmilter {

struct PostfixCheckOptions {
    std::string postconf;          // --postconf PATH; empty: /usr/sbin/postconf if executable
    std::string config_directory;  // --postfix-config DIR: passed to postconf as -c DIR
};

struct ProgramOutput {
    int exit_status = 0;
    std::string out;
    std::string err;
};

// Runs argv[0] (a path: no PATH search, no shell) with stdin from /dev/null and collects its
// stdout and stderr; kills it once `timeout` has passed. An error when it cannot be started,
// was killed by a signal or timed out; a non-zero exit status is not an error.
Result<ProgramOutput> run_program(const std::vector<std::string>& argv,
                                  std::chrono::milliseconds timeout);

// Asks `postconf` (with -c config_directory when not empty) for the main.cf values, the
// master.cf smtpd services and their -o overrides, and reads the regexp:/pcre: tables of
// milter_header_checks. `notes` gets a line for each table that could not be checked.
Result<PostfixFacts> gather_postfix_facts(const std::string& postconf,
                                          const std::string& config_directory,
                                          std::vector<std::string>& notes);

// The Postfix part of `check`: unused routes, then, where postconf is found, the wiring
// (skipped with a note when milter.mta = "sendmail").
// Prints each finding as "warning: ..." on stderr and notes as "info: ..." on stdout; never
// fails (warnings leave check's exit status alone).
void report_postfix_wiring(const Config& config, const PostfixCheckOptions& options);

}  // namespace paasmilter
