// What every GMime user in lib/ shares: one start-up of the library, and the parser options
// real mail needs, so that the ACS conversion and the Graph preparation read a message alike.
#pragma once

#include <gmime/gmime.h>

#include <memory>

#include "paasmilter/c_handle.hpp"

namespace paasmilter {

using ParserOptionsPtr = std::unique_ptr<GMimeParserOptions, Deleter<g_mime_parser_options_free>>;

// g_mime_init, once per process, with a warm-up of GMime's lazily built tables (it is not
// thread-safe itself); call before any other GMime function. Defined in mime_convert.cpp.
void init_gmime_once();

// Per call, never GMime's shared default object (not safe to modify across threads). Loose
// modes are GMime's tolerance for what real mailers send; undeclared 8-bit text is UTF-8 if
// valid, else the Windows Latin-1 superset devices and Outlook use, else ISO-8859-1 (which
// maps every byte).
inline ParserOptionsPtr make_parser_options() {
    ParserOptionsPtr options(g_mime_parser_options_new());
    g_mime_parser_options_set_rfc2047_compliance_mode(options.get(), GMIME_RFC_COMPLIANCE_LOOSE);
    g_mime_parser_options_set_parameter_compliance_mode(options.get(), GMIME_RFC_COMPLIANCE_LOOSE);
    g_mime_parser_options_set_address_compliance_mode(options.get(), GMIME_RFC_COMPLIANCE_LOOSE);
    const char* fallback[] = {"UTF-8", "windows-1252", "iso-8859-1", nullptr};
    g_mime_parser_options_set_fallback_charsets(options.get(), fallback);
    return options;
}

}  // namespace paasmilter
