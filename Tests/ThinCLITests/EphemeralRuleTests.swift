import Testing
@testable import ThinCLI
import ThinServe

@Suite struct EphemeralRuleTests {
    @Test func patternsMatchLikeTheShell() {
        let cases: [(String, String, Bool)] = [
            ("build-*", "build-1", true), ("build-*", "build-", true), ("build-*", "xbuild-1", false),
            ("*", "anything", true), ("*", "", true), ("b?ild", "build", true), ("b?ild", "bild", false),
            ("*-ci-*", "x-ci-y", true), ("*-ci-*", "x-ci", false), ("a*b*c", "aXbYbZc", true), ("a*b*c", "aXbYbZ", false),
            ("exact", "exact", true), ("exact", "exactly", false), ("**x", "abcx", true), ("ünï*", "ünïcode", true),
        ]
        for (pattern, name, expected) in cases {
            #expect(ExportPattern.matches(pattern, name) == expected, "\(pattern) vs \(name)")
        }
    }

    @Test func rulesParseOrAreRefused() {
        #expect(ServeCommand.parseEphemeral("build-*=base@golden") == EphemeralRule(pattern: "build-*", source: .clone("base@golden")))
        #expect(ServeCommand.parseEphemeral("t-*=blank:10G") == EphemeralRule(pattern: "t-*", source: .blank(10 << 30)))
        for bad in ["build-*", "=base", "build-*=", "x=blank:", "x=blank:0", "x=blank:ten", "a@b=base"] {
            #expect(ServeCommand.parseEphemeral(bad) == nil, "\(bad)")
        }
    }
}
